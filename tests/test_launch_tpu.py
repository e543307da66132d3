"""launch_tpu.sh: dry-run command lines (no gcloud on PATH), a fake-gcloud run, the remote
start/stop commands executed locally with a fake trainer, usage errors, bash -n and shellcheck."""

import os
import pathlib
import shlex
import shutil
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch_tpu.sh"
BASH = shutil.which("bash")
TOOLS = ["bash", "sh", "env", "git", "tar", "gzip", "cat", "mkdir", "rm", "setsid", "nohup",
         "sleep", "date", "hostname"]

pytestmark = pytest.mark.skipif(BASH is None, reason="bash not installed")


@pytest.fixture
def bindir(tmp_path):
    """A PATH folder with the few tools the script may use, and no gcloud."""
    d = tmp_path / "bin"
    d.mkdir()
    for t in TOOLS:
        p = shutil.which(t)
        if p:
            (d / t).symlink_to(p)
    assert shutil.which("gcloud", path=str(d)) is None
    return d


def launch(args, bindir, cwd=REPO, env_extra=None):
    env = {"PATH": str(bindir), "HOME": str(bindir.parent), "TMPDIR": str(bindir.parent)}
    env.update(env_extra or {})
    return subprocess.run([BASH, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def commands(stdout):
    """The '+ ' lines of the output, each split into words as a shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def gcloud(cmds, verb):
    return [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == verb]


def remote(cmd):
    return cmd[cmd.index("--command") + 1]


BASE = ["--name", "my-tpu", "--zone", "us-east5-a", "--project", "proj",
        "--config", "leffa_jax/configs/tryon_512.py", "--workdir", "gs://bucket/runs/a b"]


def test_bash_syntax():
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True)


def test_shellcheck():
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck not installed")
    r = subprocess.run([sc, "-S", "warning", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dry_run_create_install_train(bindir):
    r = launch(["--dry-run", *BASE, "--accelerator-type", "v5p-64", "--spot",
                "--extra", "--config.batch_size=512 --config.num_steps=10",
                "--", "--config.run_name=it's one"], bindir)
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    loc = ["--zone", "us-east5-a", "--project", "proj"]
    assert gcloud(cmds, "describe")[0][5:8] == ["my-tpu", *loc[:2]]
    (create,) = gcloud(cmds, "create")
    assert create[5:] == ["my-tpu", *loc, "--accelerator-type", "v5p-64",
                          "--version", "v2-alpha-tpuv5", "--spot"]
    (scp,) = gcloud(cmds, "scp")
    assert scp[6] == "my-tpu:leffa_jax_src.tgz" and "--worker=all" in scp
    assert scp[5].endswith(".tgz") and not os.path.exists(scp[5])  # dry run: nothing packed
    install, train = gcloud(cmds, "ssh")
    for c in (install, train):
        assert c[5] == "my-tpu" and "--worker=all" in c and c[6:10] == loc
    inst = remote(install)
    assert "tar -xzf leffa_jax_src.tgz -C leffa_jax_repo" in inst
    assert "pip install -q -r requirements.txt -c constraints.txt" in inst
    assert ("pip install -q 'jax[tpu]==0.10.2' -f "
            "https://storage.googleapis.com/jax-releases/libtpu_releases.html") in inst
    assert "pip install -q --no-deps -e ." in inst and "torch" not in inst
    words = shlex.split(remote(train).split("setsid nohup ", 1)[1].split(" >> logs/", 1)[0])
    assert words[:6] == ["env", "-u", "XLA_FLAGS", "JAX_PLATFORMS=tpu", "LEFFA_MULTIHOST=1",
                         "PYTHONUNBUFFERED=1"]
    assert words[6:] == [".venv/bin/python", "-m", "leffa_jax.train",
                         "--config", "leffa_jax/configs/tryon_512.py",
                         "--workdir", "gs://bucket/runs/a b",
                         "--config.batch_size=512", "--config.num_steps=10",
                         "--config.run_name=it's one"]
    assert remote(train).startswith("cd leffa_jax_repo")


@pytest.mark.parametrize("accel,version", [("v4-32", "tpu-ubuntu2204-base"),
                                           ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                           ("v6e-8", "v2-alpha-tpuv6e")])
def test_dry_run_default_version(bindir, accel, version):
    r = launch(["--dry-run", *BASE, "--accelerator-type", accel, "--preemptible"], bindir)
    assert r.returncode == 0, r.stderr
    (create,) = gcloud(commands(r.stdout), "create")
    assert create[-3:] == ["--version", version, "--preemptible"]


def test_dry_run_reuse_repo_url(bindir):
    r = launch(["--dry-run", *BASE, "--reuse", "--repo-url", "https://example.com/leffa_jax.git",
                "--branch", "dev"], bindir)
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert not gcloud(cmds, "create") and not gcloud(cmds, "describe")
    assert not gcloud(cmds, "scp")
    install, train = gcloud(cmds, "ssh")
    inst = remote(install)
    assert "git clone --depth 1 --branch dev https://example.com/leffa_jax.git leffa_jax_repo" in inst
    assert "fetch --depth 1 origin dev" in inst
    assert "leffa_jax.train --config leffa_jax/configs/tryon_512.py" in remote(train)


def test_dry_run_actions(bindir):
    name = ["--name", "my-tpu", "--zone", "z1"]
    (stop,) = commands(launch(["--dry-run", *name, "--stop"], bindir).stdout)
    assert stop[4] == "ssh" and "--worker=all" in stop and "kill -TERM" in remote(stop)
    (logs,) = commands(launch(["--dry-run", *name, "--logs"], bindir).stdout)
    assert "--worker=0" in logs and "tail" in remote(logs) and "logs/train.log" in remote(logs)
    (delete,) = commands(launch(["--dry-run", *name, "--delete"], bindir).stdout)
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone", "z1",
                      "--quiet"]


@pytest.mark.parametrize("args,msg", [
    (["--dry-run", "--zone", "z", "--config", "c.py", "--workdir", "w"], "--name is required"),
    (["--dry-run", "--name", "t", "--workdir", "w"], "--config is required"),
    (["--dry-run", "--name", "t", "--bogus"], "unknown argument"),
    (["--dry-run", "--name", "t", "--config", "c.py", "--workdir", "w"], "--accelerator-type"),
])
def test_usage_errors(bindir, args, msg):
    r = launch(args, bindir)
    assert r.returncode != 0
    assert msg in r.stderr
    if msg in ("--name is required", "--config is required"):
        assert "Usage: launch_tpu.sh" in r.stderr


def test_help(bindir):
    r = launch(["--help"], bindir)
    assert r.returncode == 0 and r.stdout.startswith("Usage: launch_tpu.sh")


FAKE_GCLOUD = """#!/bin/sh
for a in "$@"; do printf '%s\\037' "$a" >> "$FAKE_GCLOUD_LOG"; done
printf '\\n' >> "$FAKE_GCLOUD_LOG"
case "$4" in
  describe) exit 1 ;;
  scp) tar -tzf "$5" > "$FAKE_GCLOUD_LOG.tar" ;;
esac
exit 0
"""


def test_fake_gcloud_local_tree(bindir, tmp_path):
    gc = bindir / "gcloud"
    gc.write_text(FAKE_GCLOUD)
    gc.chmod(0o755)
    src = tmp_path / "src"
    (src / "leffa_jax").mkdir(parents=True)
    (src / "leffa_jax" / "train.py").write_text("")
    (src / ".venv").mkdir()
    (src / ".venv" / "big").write_text("x")
    (src / ".gitignore").write_text(".venv/\n")
    git = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "init", "-q", str(src)], check=True, env={**os.environ, **git})
    log = tmp_path / "gcloud.log"
    r = launch([*BASE, "--accelerator-type", "v4-32", "--src", str(src), "--extra", "--x=1"],
               bindir, env_extra={"FAKE_GCLOUD_LOG": str(log), **git})
    assert r.returncode == 0, r.stdout + r.stderr
    calls = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]
    assert [c[3] for c in calls] == ["describe", "create", "scp", "ssh", "ssh"]
    assert calls[1][4:] == ["my-tpu", "--zone", "us-east5-a", "--project", "proj",
                            "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base"]
    assert all("--worker=all" in c for c in calls[2:])
    assert "leffa_jax.train --config leffa_jax/configs/tryon_512.py" in calls[4][-1]
    assert "--x=1" in calls[4][-1]
    packed = set(pathlib.Path(tmp_path / "gcloud.log.tar").read_text().split())
    assert packed == {"leffa_jax/train.py", ".gitignore"}
    assert not list(tmp_path.glob("leffa_jax_src.*.tgz"))  # temp tarball cleaned up
    # The printed lines are the commands that ran.
    assert [c[4] for c in commands(r.stdout) if c[0] == "gcloud"] == [c[3] for c in calls]


def test_fake_gcloud_existing_slice_is_reused(bindir, tmp_path):
    gc = bindir / "gcloud"
    gc.write_text(FAKE_GCLOUD.replace("describe) exit 1", "describe) echo READY; exit 0"))
    gc.chmod(0o755)
    log = tmp_path / "gcloud.log"
    r = launch([*BASE, "--skip-install", "--repo-url", "u"], bindir,
               env_extra={"FAKE_GCLOUD_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    assert [line.split("\x1f")[3] for line in log.read_text().splitlines()] == ["describe", "ssh"]
    assert "exists (state: READY)" in r.stdout


@pytest.mark.skipif(shutil.which("setsid") is None, reason="setsid not installed")
@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_remote_start_stop_commands_run(bindir, tmp_path, shell):
    """Run the start/stop remote commands in a fake worker home (the login shell may be sh or
    bash); a fake trainer sleeps."""
    home = tmp_path / "worker"
    venv_bin = home / "leffa_jax_repo" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(
        '#!/bin/sh\necho "ARGS $* MULTI=$LEFFA_MULTIHOST PLAT=$JAX_PLATFORMS '
        'XLA=${XLA_FLAGS-unset}"\nexec sleep 30\n')
    (venv_bin / "python").chmod(0o755)
    r = launch(["--dry-run", *BASE, "--reuse", "--skip-install", "--extra", "--config.a=1"], bindir)
    (start,) = gcloud(commands(r.stdout), "ssh")
    (stop,) = gcloud(commands(launch(["--dry-run", "--name", "t", "--stop"], bindir).stdout), "ssh")
    env = {"PATH": str(bindir), "HOME": str(home), "XLA_FLAGS": "--bad"}

    def sh(cmd):
        return subprocess.run([shell, "-c", remote(cmd)], cwd=home, env=env, capture_output=True,
                              text=True, timeout=20)

    r1 = sh(start)
    assert r1.returncode == 0 and "started pid" in r1.stdout, r1.stderr
    logf = home / "leffa_jax_repo" / "logs" / "train.log"
    for _ in range(100):
        if "ARGS" in logf.read_text():
            break
        time.sleep(0.05)
    assert ("ARGS -m leffa_jax.train --config leffa_jax/configs/tryon_512.py "
            "--workdir gs://bucket/runs/a b --config.a=1 MULTI=1 PLAT=tpu XLA=unset"
            ) in logf.read_text()
    r2 = sh(start)  # a second start refuses while the first runs
    assert r2.returncode != 0 and "already training" in r2.stderr
    r3 = sh(stop)
    assert r3.returncode == 0 and "stopped" in r3.stdout, r3.stderr
    assert not (home / "leffa_jax_repo" / "logs" / "train.pid").exists()
    assert "not running" in sh(stop).stdout
