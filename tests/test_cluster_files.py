"""The files of cluster/ stay true: they parse, carry the fields Ray needs, and agree with pyproject.toml
(Ray pin, package name and version, console script) and with the real `diffedit run` argument parser.

Nothing here starts a cluster: the launcher and KubeRay files are checked for what would make them fail
or run something other than this checkout's job.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
NAME = PYPROJECT["project"]["name"]


def pins() -> dict[str, str]:
    """pyproject's exact pins, {normalised name: version}, e.g. {"ray": "2.60.0"}."""
    out = {}
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", dep.strip())
        if m:
            out[normalise(m.group(1))] = m.group(3)
    return out


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def yaml_docs() -> dict[str, list[dict]]:
    files = sorted(CLUSTER.glob("*.yaml")) + sorted(CLUSTER.glob("*.yml"))
    return {f.name: [d for d in yaml.safe_load_all(f.read_text()) if d is not None] for f in files}


def all_docs() -> list[dict]:
    return [d for docs in yaml_docs().values() for d in docs]


def launcher_configs() -> list[dict]:
    return [d for d in all_docs() if "cluster_name" in d and "provider" in d]


def kuberay(kind: str) -> list[dict]:
    return [d for d in all_docs() if d.get("kind") == kind]


def strings(node):
    """Every string value in a parsed YAML document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def cluster_texts() -> dict[str, str]:
    return {f.name: f.read_text() for f in sorted(CLUSTER.iterdir()) if f.is_file()}


def diffedit_run_commands() -> list[tuple[str, list[str]]]:
    """Every `diffedit run ...` command written in cluster/: YAML string values (entrypoints, commands)
    and the shell code blocks (```bash) of Markdown files, as (where, argv after `diffedit run`)."""
    found: list[tuple[str, str]] = []
    for name, docs in yaml_docs().items():
        for doc in docs:
            found += [(name, s) for s in strings(doc) if "diffedit run" in s]
    for md in sorted(CLUSTER.glob("*.md")):
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", md.read_text(), flags=re.S):
            block = block.replace("\\\n", " ")  # shell line continuations
            found += [(md.name, line) for line in block.splitlines() if "diffedit run" in line]
    commands = []
    for where, text in found:
        for part in text.split("diffedit run")[1:]:
            argv = []
            for token in shlex.split(part, comments=True):
                if token in {"&&", "||", ";", "|"} or token.endswith(";"):
                    break
                argv.append(token)
            commands.append((where, argv))
    return commands


# ---------------------------------------------------------------------------------------------------------
# The files parse and carry what Ray needs


def test_every_yaml_parses_and_there_is_one_of_each():
    docs = yaml_docs()
    assert docs, "no YAML in cluster/"
    for name, parsed in docs.items():
        assert parsed, f"{name} holds no YAML document"
        assert all(isinstance(d, dict) for d in parsed), name
    assert len(launcher_configs()) == 1
    assert len(kuberay("RayCluster")) == 1
    assert len(kuberay("RayJob")) == 1


def test_cluster_launcher_config():
    (cfg,) = launcher_configs()
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] in {"aws", "gcp", "azure"}
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    # The driver runs on the head: it has no GPU, so the job must not need one where the driver is.
    assert types[head]["resources"].get("GPU", 0) == 0
    gpu_types = {k: t for k, t in types.items() if k != head and t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, "no worker node type that declares a GPU"
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0, f"{name} should scale from 0"
        assert t["max_workers"] >= 1
        assert t["node_config"]["InstanceType"]
        assert t["node_config"].get("ImageId"), f"{name} needs an ImageId (Ray's default AMI is Ubuntu 18.04)"
    assert cfg["max_workers"] >= max(t["max_workers"] for t in gpu_types.values())
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert cfg[key], key
    assert any("--head" in c and "--autoscaling-config" in c for c in cfg["head_start_ray_commands"])


def test_cluster_launcher_installs_this_version_of_the_project():
    """The setup commands install the wheel that `pip wheel .` builds from this checkout, from the
    folder that file_mounts copies to every node, with the project's pinned Ray."""
    (cfg,) = launcher_configs()
    setup = "\n".join(cfg["setup_commands"])
    wheel = re.search(r"~/([\w.-]+)/(\S+?)-(\S+?)-py3-none-any\.whl", setup)
    assert wheel, "setup_commands install no project wheel"
    folder, name, version = wheel.groups()
    assert (name, version) == (NAME.replace("-", "_"), VERSION)
    mounts = {k.rstrip("/"): v for k, v in cfg["file_mounts"].items()}
    assert mounts.get(f"~/{folder}", "").rstrip("/") in {"./dist", "dist"}
    # Every command that starts Ray or runs the job sees the environment the project went into.
    venv = re.search(r"python3 -m venv (\S+)", setup)
    if venv:
        for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
            assert f"{venv.group(1)}/bin/activate" in c or f"{venv.group(1)}/bin/ray" in c, c


def test_raycluster():
    (rc,) = kuberay("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"] == pins()["ray"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append(group)
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), group["groupName"]
            assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    assert spec.get("enableInTreeAutoscaling") is True


def test_rayjob_runs_diffedit_on_the_raycluster():
    (job,) = kuberay("RayJob")
    (rc,) = kuberay("RayCluster")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"].split()[:2] == ["diffedit", "run"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]


# ---------------------------------------------------------------------------------------------------------
# --output is one folder that every node sees at the same path (the actors write parts, the driver renames)


def under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def pod_output_mount(pod: dict, output: str) -> tuple[str, str, dict] | None:
    """(mountPath, claimName, the mount) of the PVC volume that holds `output` in this pod's first container."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
    mounts = [m for m in pod["containers"][0].get("volumeMounts", [])
              if m["name"] in claims and under(output, m["mountPath"])]
    if not mounts:
        return None
    m = max(mounts, key=lambda m: len(m["mountPath"]))
    return m["mountPath"], claims[m["name"]], m


def markdown_yaml_docs() -> list[dict]:
    docs = []
    for md in sorted(CLUSTER.glob("*.md")):
        for block in re.findall(r"```ya?ml\n(.*?)```", md.read_text(), flags=re.S):
            docs += [d for d in yaml.safe_load_all(block) if isinstance(d, dict)]
    return docs


def test_kuberay_output_volume_is_mounted_on_the_head_and_every_worker_at_the_same_path():
    """The RayJob's --output is on a PVC that the head and every worker group mount at the same path,
    writable (each edit actor writes its parts there); a PVC of that name written in cluster/ is ReadWriteMany."""
    (job,) = kuberay("RayJob")
    (rc,) = kuberay("RayCluster")
    (output,) = option_values(shlex.split(job["spec"]["entrypoint"]), "--output")
    head = pod_output_mount(rc["spec"]["headGroupSpec"]["template"]["spec"], output)
    assert head, f"the head pod mounts no volume that holds --output {output}"
    path, claim, mount = head
    assert not mount.get("readOnly"), "the head mounts the output volume read-only"
    for group in rc["spec"]["workerGroupSpecs"]:
        worker = pod_output_mount(group["template"]["spec"], output)
        assert worker, f"worker group {group['groupName']} does not mount the output volume ({claim}) at {path}"
        assert worker[:2] == (path, claim), f"worker group {group['groupName']}: {worker[:2]}, head: {(path, claim)}"
        assert not worker[2].get("readOnly"), f"worker group {group['groupName']} mounts the output read-only"
    pvcs = [d for d in all_docs() + markdown_yaml_docs()
            if d.get("kind") == "PersistentVolumeClaim" and d.get("metadata", {}).get("name") == claim]
    for pvc in pvcs:
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], pvc["spec"]["accessModes"]


def nfs_mount_points(commands: list[str]) -> list[str]:
    """The mount points of `mount -t nfs|nfs4|efs ... POINT` in shell commands."""
    points = []
    for command in commands:
        for piece in re.split(r"\|\||&&|;", command):
            tokens = shlex.split(piece)
            if "mount" in tokens:
                rest = tokens[tokens.index("mount") + 1:]
                if "-t" in rest and rest[rest.index("-t") + 1] in {"nfs", "nfs4", "efs"}:
                    points.append(rest[-1])
    return points


def test_cluster_launcher_mounts_the_output_on_every_node():
    """aws.yaml mounts a network filesystem in setup_commands (run on the head and on every worker), and the
    README's `diffedit run` commands (the launcher's) put --output under that mount point."""
    (cfg,) = launcher_configs()
    points = nfs_mount_points(cfg["setup_commands"])
    assert points, "setup_commands mount no shared filesystem (mount -t nfs4) for --output"
    assert not nfs_mount_points(cfg.get("head_setup_commands") or []), "mount it on every node, not the head only"
    readme = [argv for where, argv in diffedit_run_commands() if where == "README.md"]
    assert readme, "no `diffedit run` command in cluster/README.md"
    for argv in readme:
        (output,) = option_values(argv, "--output") or option_values(argv, "-o")
        assert any(under(output, p) for p in points), f"README.md: --output {output} is not under {points}"


# ---------------------------------------------------------------------------------------------------------
# Versions and names agree with pyproject.toml


def assert_versions(expected: str, checks: list[tuple[str, str]]) -> int:
    """Assert that every version each (regex with one group, message) check finds in the cluster files is
    ``expected``; the message is formatted with {name}, {version} and {expected}. Returns how many were found."""
    found = 0
    for name, text in cluster_texts().items():
        for pattern, message in checks:
            for version in re.findall(pattern, text):
                assert version == expected, message.format(name=name, version=version, expected=expected)
                found += 1
    return found


def test_ray_version_everywhere_is_pyprojects_pin():
    seen = assert_versions(pins()["ray"], [
        (r"\bray(?:\[[^\]]*\])?==([\w.]+)", "{name} pins ray {version}, pyproject.toml {expected}"),
        (r"rayVersion:\s*['\"]?([\w.]+)", "{name} has rayVersion {version}, pyproject.toml pins {expected}"),
    ])
    assert seen >= 3  # the launcher's setup, the Dockerfile, the RayCluster


def test_other_pins_in_cluster_files_agree_with_pyproject():
    """No cluster file installs a different version of a package that pyproject.toml pins."""
    project_pins = pins()
    for name, text in cluster_texts().items():
        for pkg, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([\w.]+)", text):
            if normalise(pkg) in project_pins:
                assert version == project_pins[normalise(pkg)], f"{name}: {pkg}=={version}"


def test_images_and_wheels_carry_the_project_version():
    found = assert_versions(VERSION, [
        (rf"/{NAME}:([\w.-]+)", f"{{name}} names image {NAME}:{{version}}, pyproject.toml version is {{expected}}"),
        (rf"{NAME}-([\w.]+?)-py3-none-any\.whl", f"{{name}} installs {NAME} {{version}}, pyproject.toml has {{expected}}"),
    ])
    assert found >= 3  # two images in the RayCluster, the wheel of the launcher


def test_console_script_is_the_command_the_files_run():
    assert NAME == "diffedit"
    assert PYPROJECT["project"]["scripts"]["diffedit"] == "diffedit.pipelines.cli:main"
    assert diffedit_run_commands(), "no `diffedit run` command in cluster/"


def test_dockerfile_installs_the_whole_package():
    """The image's build context (cluster/Dockerfile.dockerignore) lets through every package folder and
    package-data folder that pyproject.toml lists, so `pip install` in the image builds the same wheel."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", dockerfile, flags=re.M)
    assert re.search(r"pip install /tmp/diffedit-src", dockerfile)
    allowed = {line[1:].strip("/") for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    tool = PYPROJECT["tool"]["setuptools"]
    folders = {p.split(".", 1)[1].split(".")[0] for p in tool["packages"] if "." in p}
    folders |= {pattern.split("/")[0] for patterns in tool.get("package-data", {}).values() for pattern in patterns}
    assert {"pyproject.toml", "__init__.py", PYPROJECT["project"]["readme"]} <= allowed
    assert folders <= allowed, f"not in the image build context: {sorted(folders - allowed)}"


# ---------------------------------------------------------------------------------------------------------
# The commands agree with the real CLI


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def run_parser() -> argparse.ArgumentParser:
    """The `run` subcommand's parser of the real CLI, however cli.py builds it: its builder function if it
    has one, otherwise the parser that `main()` is about to parse with."""
    if not (ROOT / "pipelines" / "cli.py").exists():
        pytest.skip("pipelines/cli.py does not exist yet: the commands cannot be checked against the CLI")
    import diffedit.pipelines.cli as cli
    parser = None
    for builder in ("build_parser", "make_parser", "get_parser", "parser"):
        if callable(getattr(cli, builder, None)):
            parser = getattr(cli, builder)()
            break
    if parser is None:
        original = argparse.ArgumentParser.parse_args

        def capture(self, *args, **kwargs):
            raise _Captured(self)

        argparse.ArgumentParser.parse_args = capture
        try:
            cli.main(["run", "--help"])
        except _Captured as c:
            parser = c.parser
        finally:
            argparse.ArgumentParser.parse_args = original
    assert isinstance(parser, argparse.ArgumentParser), "found no argparse parser in diffedit.pipelines.cli"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and "run" in action.choices:
            return action.choices["run"]
    raise AssertionError("the diffedit parser has no `run` subcommand")


def option_values(argv: list[str], option: str) -> list[str]:
    values = [argv[i + 1] for i, t in enumerate(argv[:-1]) if t == option]
    return values + [t.split("=", 1)[1] for t in argv if t.startswith(option + "=")]


@pytest.mark.parametrize("where_argv", diffedit_run_commands(), ids=lambda c: f"{c[0]}:{' '.join(c[1])[:40]}")
def test_cluster_commands_fit_a_cluster(where_argv):
    """--output is an absolute path on a mounted filesystem: the actors write parts there and the driver
    commits them by renaming (manifests/store.py refuses s3://), and a relative path would land in the job's
    temporary working directory, lost to a rerun. --num-gpus is given: both clusters start with no GPU node, and
    without it the job sizes its pool from the GPUs present at start (none)."""
    where, argv = where_argv
    (output,) = option_values(argv, "--output") or option_values(argv, "-o")
    assert output.startswith("/") and "://" not in output, f"{where}: --output {output}"
    (num_gpus,) = option_values(argv, "--num-gpus")
    assert int(num_gpus) >= 1


@pytest.mark.parametrize("where_argv", diffedit_run_commands(), ids=lambda c: f"{c[0]}:{' '.join(c[1])[:40]}")
def test_diffedit_run_commands_parse_with_the_real_cli(where_argv):
    where, argv = where_argv
    parser = run_parser()
    known = set(parser._option_string_actions)
    for token in argv:
        if token.startswith("--"):
            option = token.split("=", 1)[0]
            assert option in known, f"{where}: `diffedit run` has no option {option} (it has {sorted(known)})"
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `diffedit run {' '.join(argv)}` does not parse (exit {e.code})")
