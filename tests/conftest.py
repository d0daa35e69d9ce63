import os
import tempfile

# Eight host devices for the multi-device tests; set before anything imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are cached on disk: the trainer tests compile the same tiny model many times (in-process and in
# the subprocesses of the resume/multi-host tests, which inherit this variable), and loading beats recompiling.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxopd_test_jax_cache"))
