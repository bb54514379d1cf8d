"""tesla: dataset distillation by trajectory matching with constant memory.

One module per concept of the method (see docs/architecture.md):
``tesla.data`` (prepared HDF5 splits), ``tesla.models`` (networks and their flat
parameter vector), ``tesla.augment`` (differentiable siamese augmentation),
``tesla.training`` (the training loop), ``tesla.trajectories`` (expert
trajectory files), ``tesla.matching`` (gradient engines), ``tesla.soft_labels``,
``tesla.evaluation``.
"""

__version__ = "0.1.0"
