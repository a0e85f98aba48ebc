"""`make repro`'s last step: bring a missing or emptied MLflow store back from what is on disk
(`dvc repro` does not see the store): every completed run whose MLflow run is gone is rebuilt
from its checkpoint's history, then given back its export (logged and registered), its
evaluation metrics and, when anything was rebuilt, a new report run. A store that is whole is
left as it is. It calls into every stage's package, so it lives above them, with the tools only
the Makefile runs (it shares the stages' entry-point helpers: `stages`).

    python -m tools.mlflow_sync [--params params.yaml]
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core import checkpoint
from pipeline.core.params import Params
from stages import load_or_exit, parse_args, run_stage


def sync_store(params: Params, root: Path, data_dir: Path, ckpt_root: Path, export_root: Path,
               results_dir: Path, report_dir: Path) -> list[str]:
    """The names of the runs rebuilt (empty when the store was whole or nothing is trained)."""
    from pipeline.core import tracking
    from pipeline.core.exports import EXPORT_META
    from pipeline.core.runs import mlflow_run_ids
    from pipeline.evaluate.driver import flat_metrics, log_result, result_run_ids
    from pipeline.export.driver import log_export
    from pipeline.report.frontier import log_report, report_paths

    names = [run.name for run in params.runs() if (ckpt_root / run.name).is_dir()]
    if not names or not (data_dir / "manifest.json").exists():
        return []
    rebuilt: set[str] = set()
    run_ids = mlflow_run_ids(params, root, data_dir, ckpt_root, names, rebuilt)
    if not rebuilt:
        return []
    uri = tracking.tracking_uri(params.tracking.uri, root)
    tracker = tracking.Tracker.for_study(params, root)
    results = {}
    for key in params.result_keys():
        path = results_dir / f"{key}.json"
        if path.exists():
            results[key] = json.loads(path.read_text())
    winners = {r["run"] for r in results.values()}
    for name in sorted(rebuilt):
        card = export_root / name / EXPORT_META
        if card.exists():
            log_export(uri, params.tracking.experiment, run_ids[name], name, (export_root / name).resolve(),
                       checkpoint.read_json(card))
        tracker.client.set_tag(run_ids[name], "kvf.selected", str(name in winners).lower())
    redo = {key: r for key, r in results.items() if r.get("checkpoint_run", r["run"]) in rebuilt}
    # a policy's run comes back beside its checkpoint's
    for key, run_id in result_run_ids(tracker, redo, run_ids).items():
        log_result(tracker, run_id, flat_metrics(redo[key], params.eval.report_context, params.train.seq_len),
                       redo[key])
    paths = report_paths(report_dir)
    if all(p.exists() for p in paths.values()) and len(results) == len(params.result_keys()):
        log_report(params, root, list(results.values()), paths)
    return sorted(rebuilt)


def main() -> None:
    args = parse_args(__doc__)
    params = load_or_exit(args.params)
    from pipeline.core.tracking import repo_root

    def job() -> int:
        rebuilt = sync_store(params, repo_root(), Path("data"), Path("checkpoints"), Path("exports"),
                             Path("results/eval"), Path("report"))
        print(f"[mlflow] store rebuilt for {len(rebuilt)} run(s)" if rebuilt else "[mlflow] store complete")
        return 0

    run_stage(args.params, job)


if __name__ == "__main__":
    main()
