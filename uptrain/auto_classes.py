"""Registering the Block Transformer with transformers' Auto classes, lazily.

In a process that imported `uptrain`, `AutoConfig` and `AutoModelForCausalLM.from_pretrained(folder)` load
a converted folder with the installed classes, without `trust_remote_code`; with `trust_remote_code=True`
they load the installed classes too (transformers prefers a registered class to the folder's code). The
folder keeps `auto_map` and its own code files for every process that does not import `uptrain`.

Registering needs transformers' Auto modules (which import torch) and the model class needs
`transformers.modeling_utils`: seconds that light commands such as `uptrain --help` must not pay. So
`install()` imports nothing. Each registration pairs a transformers module with one of ours and runs as soon
as both have been executed, whichever comes last:

    transformers.models.auto.configuration_auto + uptrain.configuration_block_transformer
        -> AutoConfig.register
    transformers.models.auto.modeling_auto + uptrain.modeling_block_transformer
        -> AutoModelForCausalLM.register

When the transformers module of a pair is loaded, ours is imported (unless it is being imported right now,
as when `uptrain.convert` imports the model module, which imports transformers: then the registration
waits for it to finish). A finder on `sys.meta_path`, consulted only for these four module names, wraps
their loaders to hear when each one is done; it removes itself once both registrations have run.
"""

import importlib
import sys
import warnings

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"
OWN_CONFIG = "uptrain.configuration_block_transformer"
OWN_MODELING = "uptrain.modeling_block_transformer"


def _register_config(auto_module, own_module) -> None:
    config_class = own_module.BlockTransformerConfig
    # exist_ok=False: refuse a model_type that transformers itself uses, should one ever be added
    auto_module.AutoConfig.register(config_class.model_type, config_class)


def _register_model(auto_module, own_module) -> None:
    model_class = own_module.BlockTransformerForCausalLM
    auto_module.AutoModelForCausalLM.register(model_class.config_class, model_class)


# (transformers module, uptrain module, registration), removed once done
_pending = [(CONFIG_AUTO, OWN_CONFIG, _register_config), (MODELING_AUTO, OWN_MODELING, _register_model)]
_loaded: set[str] = set()  # watched modules whose execution has finished


def _advance() -> None:
    """Run every registration whose two modules are loaded; import ours where only transformers' is."""
    for pair in list(_pending):
        if pair not in _pending:  # done by a nested call (importing the uptrain module re-enters here)
            continue
        auto_name, own_name, register = pair
        if auto_name not in _loaded:
            continue
        try:
            if own_name in _loaded:
                _pending.remove(pair)
                register(sys.modules[auto_name], sys.modules[own_name])
            elif own_name not in sys.modules:  # not being imported right now: import it, which re-enters
                importlib.import_module(own_name)
        except Exception as error:  # noqa: BLE001 -- a failed registration must not break `import transformers`
            if pair in _pending:
                _pending.remove(pair)
            warnings.warn(
                f"block-uptrain could not register {own_name} with transformers' Auto classes ({error}); "
                "load converted folders with trust_remote_code=True",
                stacklevel=2,
            )
    if not _pending and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


class _NotifyingLoader:
    """Wraps a module's loader: executes the module, then tells `_advance` it is loaded."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _loaded.add(module.__name__)
        _advance()

    def __getattr__(self, name):  # get_source, get_resource_reader, ... of the real loader
        return getattr(self._loader, name)


class _Finder:
    """Finds nothing itself: asks the finders after it for a watched module and wraps the loader."""

    def find_spec(self, name, path=None, target=None):
        if name in _loaded or not any(name in pair[:2] for pair in _pending):
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _NotifyingLoader(spec.loader)
                return spec
        return None


_finder = _Finder()


def install() -> None:
    """Arrange the registrations (idempotent); run at once those whose modules are already loaded."""
    _loaded.update(name for pair in _pending for name in pair[:2] if name in sys.modules)
    if _pending and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    _advance()
