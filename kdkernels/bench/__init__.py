"""The kdkernels profiler behind ``make bench`` (``python -m kdkernels.bench``).

It times every loss on every available backend against baselines measured in the same process and
run (docs/design.md §5): eager PyTorch (the reference), ``torch.compile`` of the reference and, where
installed, Liger-Kernel's KL/JSD. One concept per module:

* ``cases``       what to run: the losses, their inputs, the presets
* ``inputs``      the random inputs of every loss family (shared with the test suite)
* ``impls``       who runs it: kdkernels backends, torch.compile of the reference, Liger
* ``timing``      forward / backward / full-step timers (perf_counter on CPU, CUDA events on GPU)
* ``rss``         this process's resident memory and its peak (``/proc/self/status``)
* ``memory``      extra memory above the inputs (CUDA allocator peak; CPU peak RSS of a fresh process)
* ``_rss_worker`` the fresh process of a CPU memory measurement
* ``floor``       the copy-bandwidth floor: bytes that must move / bandwidth of a plain copy
* ``plan``        which implementations run a case, and the status of those that do not
* ``measure``     one implementation on one case: primed, timed, its GPU memory measured
* ``rows``        the result rows: fields, derived numbers, ratios, issue targets
* ``progress``    the progress line per (case, implementation)
* ``environment`` the result's ``meta``: machine, versions, commit
* ``runner``      the loop over cases and implementations
* ``report``      table, JSON, CSV and PNG plots

Its end-to-end check is ``python_tests/test_bench_selftest.py``. The stand-alone scripts in
``benchmarks/`` use ``inputs``, ``timing``, ``rss`` and ``memory``.
"""
