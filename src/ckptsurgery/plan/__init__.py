"""A surgery as a plan of tensor operations, built from headers, gated, then executed.

::

    read headers -> build a Plan -> match + gate -> execute (stream) -> write
    (io)            (build)         (gate)          (execute)           (io writers)

:mod:`~ckptsurgery.plan.model` holds the values (:class:`Plan`, :class:`Entry`, :class:`Op`),
:mod:`~ckptsurgery.plan.ops` the operations, :mod:`~ckptsurgery.plan.build` makes a plan from
rules and merges, :mod:`~ckptsurgery.plan.gate` matches it against a model and shapes every
refusal, :mod:`~ckptsurgery.plan.execute` carries it out, and :mod:`~ckptsurgery.plan.run`
chains them for every command.
"""
