# Live curves (config `tracking`): the --tracker* options of the training jobs. They are run
# options (functions of `output`, which Snakemake does not compare), so switching a tracker
# on or off reruns nothing; tracking never changes a result. A tracker whose package is not
# installed fails the run at parse time (a dry run too), naming the pip extra.

from tesla import tracking as tesla_tracking

_tracking_problem = tesla_tracking.config_problem(config["tracking"])
if _tracking_problem:
    raise WorkflowError(f"invalid configuration in {CONFIG_FILE_HINT}:\n  {_tracking_problem}")


def tracking_options(stage: str, output) -> list[str]:
    """The --tracker* options of a job of `stage` whose first output is output[0]
    (tesla.tracking.workflow_options: TensorBoard's folder, the W&B group per target)."""
    return tesla_tracking.workflow_options(config["tracking"], stage, str(list(output)[0]))
