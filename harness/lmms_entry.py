"""The `lmms_eval.models` entry point of prunebench (pyproject.toml).

Apart from `harness.lmms` on purpose: lmms-eval loads its entry points while `lmms_eval.models` initialises, which
`harness.lmms` itself imports, so an entry point inside it would be read half-initialised (a warning on every run).
The class is named by its path and imported only when lmms-eval's CLI asks for `--model prunebench`.
"""

from lmms_eval.models.registry_v2 import ModelManifest

manifest = ModelManifest(model_id="prunebench", simple_class_path="harness.lmms.Prunebench")
