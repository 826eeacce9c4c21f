"""``autodeploy bench``: synthetic-workload benchmarks of the engine (and of HF ``generate`` as a baseline)."""
