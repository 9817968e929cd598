"""`transformers`' own common tests (`tests/test_modeling_common.py` and its siblings), taken from the sdist of the
installed `transformers` version and made importable as `tests.test_modeling_common` etc., the names they import
each other by, without copying them into this repository.

`pip download` fetches the sdist once into `.transformers_sdist/` (or `$STEP_TRANSFORMERS_SDIST_CACHE`), and only
its `tests/` folder is unpacked. The folder joins this project's own `tests` package's search path, so the
upstream files' relative imports resolve inside it. The sdist ships only the top-level `tests/*.py`: the few
modules they import from elsewhere in the transformers repository are replaced by the stand-ins below, each saying
what it replaces, and only where the sdist lacks the real one.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("STEP_TRANSFORMERS_SDIST_CACHE", REPO / ".transformers_sdist"))


class UpstreamTestsUnavailable(RuntimeError):
    """The sdist of the installed `transformers` could not be fetched or holds no common tests."""


def sdist_tests_folder(version: str = transformers.__version__) -> Path:
    """The unpacked `tests/` folder of the `transformers==version` sdist, downloaded on first use."""
    folder = CACHE / f"transformers-{version}" / "tests"
    if (folder / "test_modeling_common.py").is_file() and (folder / "__init__.py").is_file():
        return folder
    if "dev" in version or "+" in version:
        raise UpstreamTestsUnavailable(f"transformers {version} is not a release: PyPI has no sdist of it.")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   "--dest", scratch, f"transformers=={version}"]
        try:
            download = subprocess.run(command, capture_output=True, text=True, timeout=600)
            failure = ((download.stderr or download.stdout).strip().splitlines() or ["no output"])[-1][:500]
        except subprocess.TimeoutExpired:
            download, failure = None, "no answer within 10 minutes"
        archives = list(Path(scratch).glob("transformers-*.tar.gz"))
        if download is None or download.returncode != 0 or not archives:
            raise UpstreamTestsUnavailable(
                f"`pip download transformers=={version}` (its sdist) failed, so transformers' common tests cannot "
                f"run: {failure}"
            )
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archives[0]) as archive:
            members = [member for member in archive.getmembers() if member.name.startswith(prefix)]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python 3.10.12 and newer
            archive.extractall(scratch, members=members, **safe)
        unpacked = Path(scratch) / f"transformers-{version}" / "tests"
        if not (unpacked / "test_modeling_common.py").is_file():
            raise UpstreamTestsUnavailable(f"The transformers {version} sdist holds no tests/test_modeling_common.py.")
        # The repository's tests/__init__.py is empty and the sdist leaves it out; `test_configuration_common`
        # executes it (`direct_transformers_import(tests folder)`).
        (unpacked / "__init__.py").touch()
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete earlier copy
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(unpacked, folder)  # whole or not at all: an interrupted download leaves nothing half-unpacked
    return folder


def install_upstream_tests() -> Path:
    """Makes the sdist's tests importable as `tests.<module>` (raises `UpstreamTestsUnavailable` with the reason
    where they cannot be had). Returns their folder."""
    folder = sdist_tests_folder()
    package = sys.modules[__package__]  # this project's `tests`
    if str(folder) not in package.__path__:
        package.__path__.append(str(folder))
    for name, (shipped_as, build) in STAND_INS.items():
        if name not in sys.modules and not (folder.parent / shipped_as).exists():
            sys.modules[name] = build(name)
    return folder


# Stand-ins for what the top-level test files import from outside the sdist.


def _export_tester(name: str) -> types.ModuleType:
    """`tests/exporters/test_export.py` (newer than some sdists): its `ExportTesterMixin` adds the torch.export and
    ONNX export tests. Where the sdist lacks it, the project's own export tests stand in
    (tests/test_transformers_contracts.py), and the mixin adds nothing."""
    module = types.ModuleType(name, _export_tester.__doc__)
    module.ExportTesterMixin = type("ExportTesterMixin", (), {"__doc__": "No export tests: see the module."})
    return module


def _generation_tester(name: str) -> types.ModuleType:
    """`tests/generation/test_utils.py`: `GenerationTesterMixin`, the `generate()` tests. STEP does not generate,
    and `ModelTesterMixin` checks that a tester of a model that cannot generate does not inherit it."""
    module = types.ModuleType(name, _generation_tester.__doc__)
    module.GenerationTesterMixin = type("GenerationTesterMixin", (), {"__doc__": "STEP cannot generate."})
    return module


def _configuration_kwargs(name: str) -> types.ModuleType:
    """`tests/utils/test_configuration_utils.py`: `config_common_kwargs`, a value other than the default for each
    field every `PreTrainedConfig` has, which `ConfigTester.check_config_arguments_init` passes to the config class
    and expects back. Built from the installed `PreTrainedConfig`'s own fields, so no field is left out."""
    import dataclasses

    non_defaults = {
        "architectures": ["StepForSemanticSegmentation"],
        "output_hidden_states": True,
        "return_dict": False,
        "dtype": "float16",
        "chunk_size_feed_forward": 5,
        "is_encoder_decoder": True,
        "id2label": {0: "road", 1: "sky"},
        "label2id": {"road": 0, "sky": 1},
        "problem_type": "single_label_classification",
    }
    fields = {field.name for field in dataclasses.fields(transformers.PreTrainedConfig)} - {"transformers_version"}
    unknown = sorted(fields - non_defaults.keys())
    if unknown:  # a newer PreTrainedConfig: say which fields this stand-in must learn
        raise UpstreamTestsUnavailable(
            f"The config_common_kwargs stand-in in {__file__} has no value for the PreTrainedConfig fields {unknown}: "
            "add one for each."
        )
    module = types.ModuleType(name, _configuration_kwargs.__doc__)
    module.config_common_kwargs = {key: value for key, value in non_defaults.items() if key in fields}
    return module


def _hub_fixtures(name: str) -> types.ModuleType:
    """`utils/fetch_hub_objects_for_ci.py`: `url_to_local_path` maps a Hub fixture's URL to the copy CI downloaded
    beforehand, and to the URL itself where there is none. Here there is none: tests never reach the Hub, so the
    tests that load Hub images are listed as not applicable."""
    module = types.ModuleType(name, _hub_fixtures.__doc__)
    module.url_to_local_path = lambda url, **kwargs: url
    return module


def _package(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so that its stand-in submodules import
    return module


# Module name -> (where the sdist would ship it, relative to its root; the stand-in).
STAND_INS = {
    f"{__package__}.exporters": ("tests/exporters", _package),
    f"{__package__}.exporters.test_export": ("tests/exporters/test_export.py", _export_tester),
    f"{__package__}.generation": ("tests/generation", _package),
    f"{__package__}.generation.test_utils": ("tests/generation/test_utils.py", _generation_tester),
    f"{__package__}.utils": ("tests/utils", _package),
    f"{__package__}.utils.test_configuration_utils": ("tests/utils/test_configuration_utils.py",
                                                      _configuration_kwargs),
    "fetch_hub_objects_for_ci": ("utils/fetch_hub_objects_for_ci.py", _hub_fixtures),
}
