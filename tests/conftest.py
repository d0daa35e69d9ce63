import os
import tempfile

from tests.xla_env import xla_flags

# Eight host devices for the multi-device tests, and cheap compilation (tests/xla_env.py); set before anything
# imports jax.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are cached on disk: the trainer tests compile the same tiny model many times (in-process and in
# the subprocesses of the resume/multi-host tests, which inherit this variable), and loading beats recompiling.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxopd_test_jax_cache"))
# Every program, not only those that took a second to compile (JAX's default): the resume tests relaunch the same
# run several times, and most of its programs compile in under a second each.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_collection_modifyitems(items):
    """Test files with the most slow-marked tests run first (each file's own order kept): the two xdist workers
    (`--dist loadfile`) then end on short files together instead of one waiting while the other runs a long one."""
    import collections

    slow_tests = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow_tests[item.path])
