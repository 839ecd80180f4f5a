"""The kdkernels profiler behind ``make bench`` (``python -m kdkernels.bench``).

It times every loss on every available backend against baselines measured in the same process and
run (DESIGN §5): eager PyTorch (the reference), ``torch.compile`` of the reference and, where
installed, Liger-Kernel's KL/JSD. One concept per module:

* ``cases``       what to run: the losses, their inputs, the presets
* ``impls``       who runs it: kdkernels backends, torch.compile of the reference, Liger
* ``timing``      forward / backward / full-step timers (perf_counter on CPU, CUDA events on GPU)
* ``memory``      extra memory above the inputs (CUDA allocator peak; CPU peak RSS of a fresh process)
* ``_rss_worker`` the fresh process of a CPU memory measurement
* ``floor``       the copy-bandwidth floor: bytes that must move / bandwidth of a plain copy
* ``runner``      the loop over cases and implementations, guards, ratios
* ``report``      table, JSON, CSV and PNG plots
* ``selftest``    ``run_smoke(tmpdir)``: the end-to-end check used by the test suite
"""
