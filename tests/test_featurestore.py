"""ctrain.featurestore: the repo is parsed by Feast's own ``parse_repo``, so every declaration kind is
applied (``Project`` and ``Permission`` included), each apply reads its own paths, and a Project that
contradicts ``feature_store.yaml`` is refused."""

from __future__ import annotations

import shutil
import sys
import textwrap

import pytest

from ctrain import featurestore
from ctrain.errors import ConfigError
from ctrain.settings import PROJECT_ROOT, Settings

PERMISSION = textwrap.dedent('''
    from feast import FeatureView
    from feast.permissions.action import AuthzedAction
    from feast.permissions.permission import Permission
    from feast.permissions.policy import RoleBasedPolicy

    readers = Permission(name="feature_readers", types=[FeatureView], actions=[AuthzedAction.DESCRIBE],
                         policy=RoleBasedPolicy(roles=["reader"]))
''')


def _settings_with_repo(tmp_path, extra: dict[str, str]) -> Settings:
    repo = tmp_path / "repo"
    shutil.copytree(PROJECT_ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in extra.items():
        (repo / name).write_text(text)
    home = tmp_path / "home"
    return Settings(home=home, data_root=str(home / "data"), object_root=f"file://{home / 'objects'}",
                    feature_repo=repo)


def test_permission_and_project_declarations_are_applied(tmp_path) -> None:
    project = 'from feast import Project\n\nctrain = Project(name="ctrain", description="declared in the repo")\n'
    settings = _settings_with_repo(tmp_path, {"permissions.py": PERMISSION, "project.py": project})
    featurestore.apply_feature_repo(settings)
    store = featurestore.feature_store(settings)
    assert [p.name for p in store.list_permissions()] == ["feature_readers"]
    assert store.get_project("ctrain").description == "declared in the repo"
    assert {fv.name for fv in store.list_feature_views()} >= {"customer_stats", "merchant_stats"}
    # Nothing of the repo stays imported, and no bytecode is left next to the declarations.
    assert not [m for m in sys.modules if m == "repo" or m.startswith("repo.")]
    assert not list((tmp_path / "repo").rglob("__pycache__"))

    # Removing the declaration removes the permission, as `feast apply` does.
    (tmp_path / "repo" / "permissions.py").unlink()
    featurestore.apply_feature_repo(settings)
    assert featurestore.feature_store(settings).list_permissions() == []


def test_each_apply_reads_its_own_data_root(tmp_path) -> None:
    first = _settings_with_repo(tmp_path / "a", {})
    featurestore.apply_feature_repo(first)
    second = _settings_with_repo(tmp_path / "b", {})
    featurestore.apply_feature_repo(second)
    source = featurestore.feature_store(second).get_data_source("customer_stats_source")
    assert str(second.resolved_data_root) in source.path


def test_a_project_other_than_feature_store_yaml_is_refused(tmp_path) -> None:
    other = 'from feast import Project\n\nother = Project(name="someone_else")\n'
    settings = _settings_with_repo(tmp_path, {"project.py": other})
    with pytest.raises(ConfigError, match="someone_else"):
        featurestore.apply_feature_repo(settings)
