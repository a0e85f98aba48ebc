"""`params.yaml`, parsed once into typed blocks; an invalid file fails before any work, naming the field.

Blocks: `data`, `model` (widths shared by every variant), `variants` (name -> attention config;
any field may be a list: a sweep, `pipeline.core.sweep`), `match_params` (size every point to one
parameter count), `train` (`lr` may be a list), `eval`, `compute` (Ray), `tracking` (MLflow).
Every block forbids unknown keys. Each point of each variant is checked by building
`models.ModelConfig(**model, attention=point)`, so the models package stays the one authority on
what an attention config may hold.

By what each describes: `block` (the error and the base block), `data` (the data block),
`run` (train, eval, compute, tracking) and `study` (`Params`, the checks across blocks, loading).
"""
from pipeline.core.params.block import ParamsError
from pipeline.core.params.data import (
    BUILTIN_CORPUS_PATH,
    BPETraining,
    CorpusConfig,
    DataConfig,
    LocalTokenizer,
    MQARConfig,
    PretrainedTokenizer,
    RetrievalConfig,
    TrainedTokenizer,
)
from pipeline.core.params.run import (
    REPORT_CONTEXT,
    ComputeConfig,
    EvalConfig,
    MixtureConfig,
    PolicySpec,
    TrackingConfig,
    TrainConfig,
)
from pipeline.core.params.study import (
    RETROFIT_FIELDS,
    MatchConfig,
    Params,
    Run,
    load_params,
    parse_params,
    policy_key,
)

__all__ = [
    "ParamsError", "BUILTIN_CORPUS_PATH", "BPETraining", "CorpusConfig", "DataConfig", "LocalTokenizer",
    "MQARConfig", "PretrainedTokenizer", "RetrievalConfig", "TrainedTokenizer", "REPORT_CONTEXT",
    "ComputeConfig", "EvalConfig", "MixtureConfig", "PolicySpec", "TrackingConfig", "TrainConfig",
    "RETROFIT_FIELDS", "MatchConfig", "Params", "Run", "load_params", "parse_params", "policy_key",
]
