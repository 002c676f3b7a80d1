"""The start-up line and the backend checks (train/backend.py), on this machine's fake CPU
devices and on stand-in GPU devices."""
import types

import jax
import ml_collections
import pytest

from siglip_fair.train import backend


def _gpu(kind, capability, process=0):
  return types.SimpleNamespace(platform="gpu", device_kind=kind, process_index=process,
                               compute_capability=capability)


def test_describe_counts_this_machines_devices():
  line = backend.describe()
  assert line == f"devices: {jax.device_count()} x cpu (backend cpu, 1 process)"


def test_describe_groups_kinds_and_processes():
  devices = [_gpu("NVIDIA H100 80GB HBM3", "9.0", p) for p in (0, 0, 1, 1)]
  assert backend.describe(devices) == ("devices: 4 x NVIDIA H100 80GB HBM3 (backend gpu, "
                                       "2 processes)")


def test_fallback_note_only_when_a_plugin_found_no_device():
  assert backend.fallback_note("cpu", []) is None
  assert backend.fallback_note("gpu", ["gpu"]) is None
  note = backend.fallback_note("cpu", ["gpu"])
  assert "GPU plugin is installed but found no GPU device" in note and "CPU" in note
  # This environment has no accelerator plugin: no note, and the list says so.
  assert backend.installed_plugins() == [] and backend.fallback_note() is None


def test_bfloat16_checks():
  assert backend.check_dtype("float32") is None
  assert "emulated" in backend.check_dtype("bfloat16")  # these CPU devices
  assert backend.check_dtype("bfloat16", [_gpu("NVIDIA A100", "8.0")]) is None
  assert backend.check_dtype("bfloat16", [_gpu("NVIDIA H100", "9.0")]) is None
  with pytest.raises(ValueError, match=r"compute capability 8.0 or newer.*Tesla V100.* 7.0"):
    backend.check_dtype("bfloat16", [_gpu("Tesla V100", "7.0")])
  assert backend.check_dtype("float32", [_gpu("Tesla V100", "7.0")]) is None


def test_startup_lines_carry_the_dtype_warning():
  config = ml_collections.ConfigDict({"model": {"dtype": "bfloat16"}})
  lines = backend.startup_lines(config)
  assert lines[0].startswith("devices: ") and "emulated" in lines[1]
  config.model.dtype = "float32"
  assert backend.startup_lines(config) == [backend.describe()]
