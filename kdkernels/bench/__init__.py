"""The kdkernels profiler behind ``make bench`` (``python -m kdkernels.bench``).

It times every loss on every available backend against baselines measured in the same process and
run (docs/design.md §5): the usual eager composition users write (``baselines``), ``torch.compile``
of it and, where installed, torchdistill's losses and Liger-Kernel's KL/JSD (``peers``);
``kdkernels.reference``, the accuracy spec, is shown but is no ratio's baseline. One concept per module:

* ``cases``       what to run: the losses, their inputs, the presets
* ``inputs``      the random inputs of every loss family (shared with the test suite)
* ``baselines``   the eager compositions (the ``eager`` baseline; ``compile`` compiles them)
* ``peers``       torchdistill and Liger, their options mapped, what they cannot run said so
* ``impls``       who runs it: the baselines, the peers, the reference, the kdkernels backends
* ``timing``      forward / backward / full-step timers (perf_counter on CPU, CUDA events on GPU)
* ``rss``         this process's resident memory and its peak (``/proc/self/status``)
* ``memory``      extra memory above the inputs (CUDA allocator peak; CPU peak RSS of a fresh process)
* ``_rss_worker`` the fresh process of a CPU memory measurement
* ``floor``       the floors: copy (bytes that must move / copy bandwidth) and GEMM (plain torch.mm of the FLOPs)
* ``plan``        which implementations run a case, and the status of those that do not
* ``measure``     one implementation on one case: primed, timed, its GPU memory measured
* ``rows``        the result rows: fields, derived numbers, ratios, issue targets
* ``progress``    the progress lines: per case (with an ETA) and per (case, implementation)
* ``environment`` the result's ``meta``: machine, versions, commit
* ``runner``      the loop over cases and implementations
* ``report``      table, JSON, CSV and PNG plots

Its end-to-end check is ``python_tests/test_bench_selftest.py``. The stand-alone scripts in
``benchmarks/`` use ``inputs``, ``timing``, ``rss`` and ``memory``.
"""
