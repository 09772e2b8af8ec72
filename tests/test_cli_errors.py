"""Every command's user errors (ctxjax/cli.py): one line `<command>: <message>` on stderr,
exit 2, no traceback; CTXJAX_TRACEBACK=1 / --verbosity=1 show it; a bug keeps its traceback.
And a training run's terminal holds ctxjax's lines, its log file orbax's (ctxjax/train/logs.py).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from ctxjax import cli
from ctxjax.train import logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["ctxjax.train", "--config=configs/tiny.py", "--workdir={d}/run"]
AOT = ["ctxjax.aot", "--config=configs/tiny.py", "--devices=cpu:1"]
EXPORT = ["ctxjax.export_hf", "--out={d}/out"]

# (id, command line ({d} = the inputs below), what the one line must say)
CASES = [
    ("train-unknown-key", [*TRAIN, "--config.model.hidden_sise=8"],
     "unknown config key model.hidden_sise; did you mean 'model.hidden_size'"),
    ("train-bad-value", [*TRAIN, "--config.train.steps=0"], "train.steps must be a positive"),
    ("train-bad-type", [*TRAIN, "--config.train.steps=abc"], "--config.train.steps=abc"),
    ("train-unknown-flag", [*TRAIN, "--stepz=3"], "Unknown command line flag 'stepz'"),
    ("train-config-missing", ["ctxjax.train", "--config={d}/nope.py", "--workdir={d}/run"],
     "nope.py is not a file; give a recipe file"),
    ("train-config-is-dir", ["ctxjax.train", "--config={d}", "--workdir={d}/run"],
     "is a directory"),
    ("train-config-syntax", ["ctxjax.train", "--config={d}/syntax.py", "--workdir={d}/run"],
     "syntax.py:2; fix the recipe"),
    ("train-config-no-get-config", ["ctxjax.train", "--config={d}/noget.py",
                                    "--workdir={d}/run"], "defines no get_config()"),
    ("train-config-unreadable", ["ctxjax.train", "--config={d}/sealed.py", "--workdir={d}/run"],
     "sealed.py is not readable"),
    ("train-workdir-is-file", ["ctxjax.train", "--config=configs/tiny.py",
                               "--workdir={d}/file"], "is a file, not a directory"),
    ("train-workdir-unwritable", ["ctxjax.train", "--config=configs/tiny.py",
                                  "--workdir={d}/locked/run"], "locked is not writable"),
    ("train-init-from-missing", [*TRAIN, "--config.train.init_from={d}/nope"],
     "config.train.init_from={d}/nope: no such directory; give a ctxjax workdir"),
    ("train-init-from-hf-is-file", [*TRAIN, "--config.train.init_from_hf={d}/file"],
     "config.train.init_from_hf={d}/file is a file; give a Hugging Face model directory"),
    ("evaluate-workdir-is-file", ["ctxjax.evaluate", "--workdir={d}/file"],
     "--workdir={d}/file is a file; give a training run's"),
    ("evaluate-workdir-unwritable", ["ctxjax.evaluate", "--workdir={d}/locked"],
     "--workdir={d}/locked/eval: {d}/locked is not writable"),
    ("evaluate-hf-malformed", ["ctxjax.evaluate", "--workdir={d}/empty", "--hf={d}/hf_bad"],
     "--hf="),
    ("evaluate-bad-lengths", ["ctxjax.evaluate", "--workdir={d}/empty", "--lengths=abc"],
     "--lengths=abc"),
    ("import-hf-missing", ["ctxjax.import_hf", "--hf_dir={d}/nope", "--workdir={d}/run"],
     "--hf_dir={d}/nope: no such directory"),
    ("import-hf-is-file", ["ctxjax.import_hf", "--hf_dir={d}/file", "--workdir={d}/run"],
     "--hf_dir={d}/file is a file"),
    ("import-hf-unreadable", ["ctxjax.import_hf", "--hf_dir={d}/sealed", "--workdir={d}/run"],
     "--hf_dir={d}/sealed is not readable"),
    ("import-hf-malformed", ["ctxjax.import_hf", "--hf_dir={d}/hf_bad", "--workdir={d}/run"],
     "{d}/hf_bad/config.json is not valid JSON"),
    ("import-hf-bad-safetensors", ["ctxjax.import_hf", "--hf_dir={d}/hf_junk",
                                   "--workdir={d}/run"],
     "{d}/hf_junk/model.safetensors is not a readable safetensors file"),
    ("import-workdir-is-file", ["ctxjax.import_hf", "--hf_dir={d}/hf_bad",
                                "--workdir={d}/file"], "--workdir={d}/file: {d}/file is a file"),
    ("export-workdir-missing", [*EXPORT, "--workdir={d}/nope"],
     "--workdir={d}/nope: no such directory"),
    ("export-no-checkpoint", [*EXPORT, "--workdir={d}/empty"],
     "holds neither a training run's checkpoints/ nor an import"),
    ("export-malformed", [*EXPORT, "--workdir={d}/import_bad"],
     "{d}/import_bad/model_config.json is not valid JSON"),
    ("export-out-is-file", ["ctxjax.export_hf", "--workdir={d}/empty", "--out={d}/file"],
     "--out={d}/file: {d}/file is a file"),
    ("export-out-unwritable", ["ctxjax.export_hf", "--workdir={d}/empty",
                               "--out={d}/locked/out"], "locked is not writable"),
    ("aot-unknown-key", [*AOT, "--config.optim.lr=1"], "unknown config key optim.lr"),
    ("aot-config-missing", ["ctxjax.aot", "--config={d}/nope.py"], "nope.py is not a file"),
    ("aot-bad-devices", ["ctxjax.aot", "--config=configs/tiny.py", "--devices=gpu:8"],
     "--devices='gpu:8'; valid form: cpu:N"),
]


HF_CONFIG = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=128)

# Root ignores permission bits; without the capabilities that let it, it does not.
AS_USER = (["setpriv", "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else [])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """A directory of bad inputs: files, a malformed HF directory and import, an unwritable
  and an unreadable directory, broken recipes."""
  if AS_USER and not shutil.which("setpriv"):
    pytest.skip("running as root without setpriv: permission errors cannot happen")
  d = tmp_path_factory.mktemp("inputs")
  for sub in ("empty", "hf_bad", "hf_junk", "import_bad/hf_import", "locked", "sealed"):
    (d / sub).mkdir(parents=True)
  files = {"file": "", "syntax.py": "def get_config():\n  return dict(a=)\n", "noget.py": "x = 1\n",
           "sealed.py": "def get_config():\n  return {}\n", "hf_bad/config.json": "{bad",
           "import_bad/model_config.json": '{"hidden_size": 8,',
           "hf_junk/config.json": json.dumps(HF_CONFIG), "hf_junk/model.safetensors": "junk"}
  for name, text in files.items():
    (d / name).write_text(text)
  for name, mode in (("locked", 0o500), ("sealed", 0o000), ("sealed.py", 0o000)):
    (d / name).chmod(mode)
  yield str(d)
  for name in ("locked", "sealed"):
    (d / name).chmod(0o700)


def _command(args, d, **env):
  base = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
  env = {**base, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **env}
  return subprocess.run([*AS_USER, sys.executable, "-m", *[a.format(d=d) for a in args]],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_and_exit_2(inputs, args, expected):
  proc = _command(args, inputs)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr + proc.stdout
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith(f"{args[0]}: "), lines[0]
  assert expected.format(d=inputs) in lines[0], lines[0]


@pytest.mark.parametrize("how", [{"CTXJAX_TRACEBACK": "1"}, "--verbosity=1"])
def test_traceback_on_request(inputs, how):
  extra = [how] if isinstance(how, str) else []
  env = how if isinstance(how, dict) else {}
  proc = _command([*TRAIN, "--config.train.steps=0", *extra], inputs, **env)
  assert proc.returncode == 2
  assert "Traceback" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("ctxjax.train: train.steps must be")


def _raise_from_ctxjax(tmp_path, monkeypatch, name: str, body: str):
  """A function `body` as if it were ctxjax's (cli.PACKAGE_DIR points at tmp_path)."""
  path = tmp_path / f"{name}.py"
  path.write_text("import jax.numpy as jnp\nimport numpy as np\ndef f(x):\n" + body + "\n")
  monkeypatch.setattr(cli, "PACKAGE_DIR", str(tmp_path) + os.sep)
  namespace = {}
  exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102
  return namespace["f"]


@pytest.mark.parametrize("jit", [False, True])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, jit):
  """Only a `raise` in ctxjax is a user error: a ValueError from inside jax, or from a C
  function (numpy's reshape) whose innermost Python frame is the ctxjax line calling it,
  is a bug."""
  import jax
  import jax.numpy as jnp
  validation = _raise_from_ctxjax(tmp_path, monkeypatch, "validation",
                                  "  raise ValueError(\n      'model.hidden_size must be > 0')")
  inside_jax = _raise_from_ctxjax(tmp_path, monkeypatch, "inside_jax", "  return jnp.stack([])")
  in_c = _raise_from_ctxjax(tmp_path, monkeypatch, "in_c", "  return np.ones(4).reshape(3)")
  cases = [(validation, True), (inside_jax, False)] + ([] if jit else [(in_c, False)])
  for f, user in cases:
    with pytest.raises(ValueError) as info:
      (jax.jit(f) if jit else f)(jnp.ones(3))
    assert cli.is_user_error(info.value) is user, f


def test_bug_in_a_command_is_not_swallowed():
  with pytest.raises(KeyError):
    with cli.boundary("ctxjax.x"):
      raise KeyError("a bug")
  with pytest.raises(SystemExit) as info:
    with cli.boundary("ctxjax.x"):
      raise cli.UserError("--flag=1: give 2")
  assert info.value.code == 2


def test_malformed_json_names_its_file(tmp_path):
  path = tmp_path / "config.json"
  path.write_text("{bad")
  with pytest.raises(json.JSONDecodeError) as info:
    with open(path, encoding="utf-8") as f:
      json.load(f)
  assert cli.one_line(info.value).startswith(f"{path} is not valid JSON (")


def test_os_errors_read_as_path_and_fix(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    open(tmp_path / "nope", encoding="utf-8")
  want = f"{tmp_path / 'nope'}: No such file or directory; check the path"
  assert cli.one_line(info.value) == want


def test_hints_name_the_flag_not_the_keyword():
  with pytest.raises(FileExistsError, match=r"out is not empty; pass --overwrite to replace it"):
    with cli.flag_names(overwrite="--overwrite"):
      raise FileExistsError("out is not empty; pass overwrite=True to replace it")
  with pytest.raises(ValueError, match=r"^model.overwrite=3 is bad$"):  # a config key stays
    with cli.flag_names(overwrite="--overwrite"):
      raise ValueError("model.overwrite=3 is bad")


def test_a_remote_workdir_logs_locally():
  path = logs.log_path("gs://bucket/run", "train")
  assert path.startswith(tempfile.gettempdir()) and os.path.isdir(os.path.dirname(path))


@pytest.mark.slow
def test_training_terminal_shows_ctxjax_lines_and_the_log_file_orbax(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "ctxjax.train", "--config=configs/tiny.py",
         f"--workdir={workdir}", "--config.train.steps=2", "--config.train.log_every=1",
         "--config.train.save_every=1", "--config.train.eval_batches=1",
         "--config.model.num_hidden_layers=1", "--config.model.hidden_size=32",
         "--config.model.intermediate_size=64", "--config.model.num_attention_heads=2",
         "--config.model.num_key_value_heads=2", "--config.model.head_dim=16",
         "--config.data.seq_len=32", "--config.data.batch_size=2",
         "--config.optim.warmup_steps=1"]
  env = {**os.environ, "CTXJAX_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": ROOT}
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [log] = list((workdir / "logs").iterdir())
  assert log.name.startswith("train.") and log.name.endswith(".log")
  assert f"library INFO lines go to {log}" in proc.stderr
  assert "trainer.py" in proc.stderr and "step 2 stage 0" in proc.stderr  # ctxjax's own lines
  assert "orbax" not in proc.stderr and "checkpoint_manager.py" not in proc.stderr, proc.stderr
  text = log.read_text()
  assert "checkpoint_manager.py" in text and "Saving checkpoint at step 2" in text
  assert "step 2 stage 0" in text  # the file holds everything
