"""The gradient engines of the matching loss, by name (no torch at import: the workflow checks a
config's engines while it builds the job graph). The engines themselves are in
:mod:`tesla.matching`:

* ``exact``: the exact gradient, a forward sweep then a reverse sweep with Hessian-vector
  products (constant memory in the number of student steps);
* ``tesla``: TESLA's first-order reverse sweep (no Hessian term);
* ``unroll``: autograd through the unrolled student trajectory (memory grows with the steps).

and the ways the student steps of ``exact``/``tesla`` run (``--compile``; :mod:`tesla.step_compiler`).
"""

from __future__ import annotations

__all__ = ["COMPILE_MODES", "ENGINES"]

#: every gradient engine
ENGINES: tuple[str, ...] = ("exact", "tesla", "unroll")
#: how the student steps run: auto (off on the CPU, inductor-cudagraph on CUDA), off (eager),
#: inductor, cudagraph, inductor-cudagraph
COMPILE_MODES: tuple[str, ...] = ("auto", "off", "inductor", "cudagraph", "inductor-cudagraph")
