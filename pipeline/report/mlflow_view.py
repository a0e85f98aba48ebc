"""The frontier view of the MLflow UI, saved in the experiment by the report stage (and again by
`make ui`, tools/mlflow_ui.py): an experiment tag `mlflow.sharedViewState.kvf-frontier` (the UI's
own "saved view") that lists the evaluated runs flat, sorted by cache bytes, with the report's
columns and one scatter per frontier measure against log10 cache bytes (the UI's scatter has no
log axis)."""
from __future__ import annotations

import json
import time

from pipeline.core.results import MEASURES

VIEW_ID = "kvf-frontier"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
X_KEY = "frontier/log10_cache_bytes"
SORT_KEY = "frontier/cache_bytes"  # every evaluated run has it; any order but start time lists runs flat
MAX_TAG_CHARS = 20_000  # MLflow's limit on a tag value


def _section(key: str) -> str:
    """The chart section the UI files a metric under: its key up to the last `/`."""
    return key.rsplit("/", 1)[0] if "/" in key else "Model metrics"


def view_state(metric_keys: list[str]) -> dict:
    """The saved view: evaluated runs only (they have frontier metrics), flat, with a scatter
    per drawn measure the runs hold (a one-layer study has no `mqar_reach`) first and every
    other metric's section collapsed."""
    drawn = [m for m in MEASURES if m.panel and f"frontier/{m.column}" in metric_keys]
    main = "kvf-frontier"
    sections = [{"uuid": main, "name": "Frontier: each measure against log10 cache bytes", "display": True,
                 "isReordered": False, "deleted": False, "isGenerated": False}]
    sections += [{"uuid": f"kvf-{i}", "name": name, "display": False, "isReordered": False, "deleted": False,
                  "isGenerated": True} for i, name in enumerate(sorted({_section(k) for k in metric_keys}))]
    charts = [{"uuid": f"kvf-{m.column}", "type": "SCATTER", "runsCountToCompare": 100, "metricSectionId": main,
               "deleted": False, "isGenerated": False, "xaxis": {"key": X_KEY, "type": "METRIC"},
               "yaxis": {"key": f"frontier/{m.column}", "type": "METRIC"}} for m in drawn]
    columns = [f"metrics.`frontier/{c}`" for c in ["cache_bytes"] + [m.column for m in MEASURES]]
    return {
        "searchFilter": f"metrics.`{SORT_KEY}` > 0", "orderByKey": f"metrics.`{SORT_KEY}`", "orderByAsc": True,
        "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
        "selectedColumns": columns + ["tags.`kind`", "params.`family`"], "columnOrder": [], "columnWidths": {},
        "runsHiddenMode": "SHOW_ALL",  # the default plots the first 10 runs only
        "compareRunCharts": charts, "compareRunSections": sections, "isAccordionReordered": True,
        "viewMaximized": False, "runListHidden": False, "groupBy": None, "groupsExpanded": {},
        "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "chartsSearchFilter": "",
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def write_view(client, experiment_id: str) -> None:
    """Set (or refresh) the experiment's frontier view from the metrics its runs hold."""
    keys = sorted({k for run in client.search_runs([experiment_id], max_results=5000) for k in run.data.metrics})
    now = int(time.time() * 1000)
    value = json.dumps({"name": "kv-frontier: the frontier", "createdAt": now, "updatedAt": now,
                        "state": json.dumps(view_state(keys), separators=(",", ":"))}, separators=(",", ":"))
    if len(value) > MAX_TAG_CHARS:
        raise ValueError(f"{VIEW_TAG}: {len(value)} characters, MLflow keeps at most {MAX_TAG_CHARS}")
    client.set_experiment_tag(experiment_id, VIEW_TAG, value)
