"""Decoding strategies, registered by name. Each is a `strategy.Strategy` (scheduler half and request
format) with an optional `strategy.StrategyRunner` (runner half); the engine, the request format,
admission and the frontends find them here and name none.

Token-by-token models (LlamaGen) take a per-request strategy: "raster" (the default), "zipar"
(`zipar.py`), "sjd" (`sjd.py`), "zipar_sjd" (`zipar_sjd.py`). A family whose model decodes in its
own order names it in its config (`config.decoding`); every request to such a model runs under that
order's strategy, which decides which requested names it serves (next-scale, `next_scale.py`:
"raster", its plain scale order, and "code", CoDe's drafter/refiner hand-off).

Adding a strategy: a module under `samplers/` and `register_strategy(name, "module:Class")`. The
registry is per process: with vLLM's engine in its own process, register from a `vllm.general_plugins`
entry point (it runs in every process) or from the module this package's plugin imports.
"""

# strategy name -> its class ("module:Class", loaded on first use). Insertion order is the order
# names are listed in messages.
STRATEGIES: dict = {
    "raster": "vllm_visual_ar.samplers.raster:Raster",
    "zipar": "vllm_visual_ar.samplers.zipar:ZipAR",
    "sjd": "vllm_visual_ar.samplers.sjd:SJD",
    "zipar_sjd": "vllm_visual_ar.samplers.zipar_sjd:ZipARSJD",
    "code": "vllm_visual_ar.samplers.next_scale:NextScale",
}
# config.decoding -> the strategy that runs every request of such a model.
ORDERS: dict = {
    "next_scale": "vllm_visual_ar.samplers.next_scale:NextScale",
}


def register_strategy(name: str, strategy, order: str | None = None) -> None:
    """Register `strategy` (a `Strategy` subclass or "module:Class") under `name`; with `order`, as
    the strategy of every request to models whose config.decoding is `order`."""
    STRATEGIES[name] = strategy
    if order is not None:
        ORDERS[order] = strategy


_loaded: dict[str, type] = {}


def _load(entry):
    if not isinstance(entry, str):
        return entry
    if entry not in _loaded:  # requests are parsed often (scheduler bookkeeping): import once
        from vllm_visual_ar.families import load_object

        _loaded[entry] = load_object(entry)
    return _loaded[entry]


def strategy_names() -> tuple[str, ...]:
    return tuple(STRATEGIES)


def strategy_class(name: str):
    """The class registered under a requested strategy name (KeyError if none)."""
    return _load(STRATEGIES[name])


def strategy_for(config, decoding):
    """The class that runs a request with this `Decoding` on a model of `config`."""
    order = getattr(config, "decoding", None)
    return _load(ORDERS[order]) if order is not None else strategy_class(decoding.strategy)


def decoding_problem(config, decoding) -> str | None:
    """Why a model of `config` cannot decode an image this way, or None."""
    return strategy_for(config, decoding).problem(config, decoding)
