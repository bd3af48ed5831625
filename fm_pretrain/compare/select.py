"""Which runs to compare: tracking stores, experiments, run ids and MLflow filter strings.

A store is given as
- a directory: every `mlflow.db` sqlite file below it (the per-run stores `runs/<name>/mlflow.db` that training
  writes by default; `checkpoints/`, `mlartifacts/` and hidden directories are not searched);
- a sqlite file (`path/to/mlflow.db`) or URI (`sqlite:////abs/path/mlflow.db`);
- a tracking server, `http://host:port` (an `mlflow server`), or any other URI the MLflow client accepts.

Runs are found with the MLflow client in every store (`search_runs`, so filter strings have MLflow's own
syntax, e.g. ``params.`model.fm.top_k` = '32'`` or ``tags.model_type = 'fm'``); their metric histories are read
by history.py. Runs tagged `kind=comparison` (our own reports) are left out unless named by id.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from . import names

STORE_FILE = "mlflow.db"
SKIP_DIRS = {"checkpoints", "mlartifacts", "mlruns", "__pycache__", "node_modules"}
LIST_LIMIT = 40  # names listed per store in an error message


class CompareError(ValueError):
    """Bad input to the comparison (unknown store, experiment or run id, bad filter); the message says what exists."""


@dataclass(frozen=True)
class Store:
    """One MLflow tracking store, by URI."""

    uri: str

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of a `sqlite:///` URI, else None."""
        if not self.uri.startswith("sqlite:///"):
            return None
        path = unquote(self.uri[len("sqlite:///") :].split("?", 1)[0])
        return Path(os.path.abspath(path)) if path and path != ":memory:" else None

    @property
    def kind(self) -> str:
        """'sqlite' (read with SQL), 'http' (a tracking server) or 'other' (read with the MLflow client)."""
        if self.sqlite_path is not None:
            return "sqlite"
        return "http" if self.uri.startswith(("http://", "https://")) else "other"

    def __str__(self) -> str:
        return str(self.sqlite_path) if self.sqlite_path is not None else self.uri


@dataclass
class RunRecord:
    """A selected run: identity, status, params, tags and latest metric values (from `search_runs`)."""

    run_id: str
    name: str
    experiment_id: str
    experiment: str
    store: Store
    status: str
    start_ms: int | None
    end_ms: int | None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    latest: dict[str, float] = field(default_factory=dict)


@dataclass
class Selection:
    runs: list[RunRecord]
    stores: list[Store]
    notes: list[str] = field(default_factory=list)  # e.g. a run found in two stores


def find_sqlite_stores(root: Path) -> list[Path]:
    """Every `mlflow.db` below `root`, sorted, without descending into checkpoints or artifact directories."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        if STORE_FILE in filenames:
            found.append(Path(dirpath) / STORE_FILE)
    return found


def resolve_stores(specs: Sequence[str]) -> list[Store]:
    """Stores from command-line specs (directories, sqlite files, URIs), without repeats, in the given order."""
    if not specs:
        raise CompareError("no store given: pass --store (a directory with mlflow.db files, a sqlite file, or a "
                           "tracking URI such as http://host:5000) or set MLFLOW_TRACKING_URI")  # fmt: skip
    stores: list[Store] = []
    for spec in specs:
        if "://" in spec or spec.startswith("sqlite:"):
            store = Store(spec)
            if store.kind == "sqlite" and not store.sqlite_path.is_file():
                raise CompareError(f"store {spec}: no such sqlite file {store.sqlite_path}")
            new = [store]
        else:
            path = Path(spec)
            if path.is_dir():
                files = find_sqlite_stores(path)
                if not files:
                    raise CompareError(f"store {spec}: no {STORE_FILE} file anywhere below this directory")
                new = [Store(f"sqlite:///{f.resolve()}") for f in files]
            elif path.is_file():
                new = [Store(f"sqlite:///{path.resolve()}")]
            else:
                raise CompareError(f"store {spec}: not found (give a directory holding {STORE_FILE} files, a sqlite "
                                   "file, or a tracking URI such as http://host:5000)")  # fmt: skip
        stores += [s for s in new if s not in stores]
    return stores


def _client(store: Store):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store.uri)


def _experiments(client, store: Store) -> list:
    from mlflow.entities import ViewType

    try:
        return list(client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=50000))
    except Exception as e:  # unreachable server, not an MLflow database, out-of-date schema, ...
        raise CompareError(f"store {store}: cannot list its experiments: {e}") from None


def _search(client, experiment_ids: list[str], filter_string: str) -> list:
    """Every active run of the experiments matching the filter (paged)."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    if not experiment_ids:
        return []
    runs, token = [], None
    while True:
        try:
            page = client.search_runs(experiment_ids, filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                      max_results=1000, page_token=token)  # fmt: skip
        except MlflowException as e:
            raise CompareError(f"--filter {filter_string!r}: {e.message}") from None
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _record(run, store: Store, exp_names: dict[str, str]) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(
        run_id=info.run_id,
        name=info.run_name or data.tags.get("mlflow.runName", "") or info.run_id[:8],
        experiment_id=str(info.experiment_id),
        experiment=exp_names.get(str(info.experiment_id), str(info.experiment_id)),
        store=store,
        status=info.status,
        start_ms=info.start_time,
        end_ms=info.end_time,
        params=dict(data.params),
        tags=dict(data.tags),
        latest={k: float(v) for k, v in data.metrics.items()},
    )


def _listing(items: Iterable[str]) -> str:
    items = list(items)
    more = f", ... and {len(items) - LIST_LIMIT} more" if len(items) > LIST_LIMIT else ""
    return ", ".join(items[:LIST_LIMIT]) + more if items else "(none)"


def select_runs(
    stores: Sequence[Store],
    experiments: Sequence[str] = (),
    run_ids: Sequence[str] = (),
    filter_string: str = "",
    include_comparisons: bool = False,
) -> Selection:
    """The runs to compare: those of the named experiments (all experiments when neither experiments nor run ids
    are given) plus the named run ids, restricted by the filter string; unknown names are errors listing what
    exists. A run id found in several stores (one server and its sqlite file, say) is taken from the first."""
    from mlflow.exceptions import MlflowException

    experiments, run_ids = list(dict.fromkeys(experiments)), list(dict.fromkeys(run_ids))
    found_exps: set[str] = set()
    found_ids: dict[str, RunRecord] = {}
    by_id: dict[str, RunRecord] = {}
    notes: list[str] = []
    inventory: dict[Store, tuple[list, object]] = {}
    for store in stores:
        client = _client(store)
        exps = _experiments(client, store)
        inventory[store] = (exps, client)
        exp_names = {str(e.experiment_id): e.name for e in exps}
        by_name = {e.name: str(e.experiment_id) for e in exps}
        if experiments:
            exp_ids = [by_name[n] for n in experiments if n in by_name]
            found_exps.update(n for n in experiments if n in by_name)
        else:
            exp_ids = [] if run_ids else list(exp_names)
        # the named runs of this store (a filter applies to them too)
        named = []
        for rid in run_ids:
            if rid in found_ids:
                continue
            try:
                run = client.get_run(rid)
            except MlflowException:
                continue
            if run.info.lifecycle_stage == "deleted":
                continue
            named.append(_record(run, store, exp_names))
        if filter_string and named:
            keep = {r.info.run_id for r in _search(client, sorted({n.experiment_id for n in named}), filter_string)}
            named = [n for n in named if n.run_id in keep]
        for rec in named:
            found_ids[rec.run_id] = rec
        candidates = named + [
            _record(r, store, exp_names)
            for r in _search(client, exp_ids, filter_string)
            if include_comparisons or r.data.tags.get(names.T_KIND) != names.KIND_COMPARISON
        ]
        for rec in sorted(candidates, key=lambda r: (r.experiment, r.start_ms or 0, r.run_id)):
            if rec.run_id in by_id:
                if by_id[rec.run_id].store != store:
                    notes.append(f"run {rec.run_id} ({rec.name}) is in {by_id[rec.run_id].store} and {store}: "
                                 f"using the first")  # fmt: skip
                continue
            by_id[rec.run_id] = rec

    missing_exps = [n for n in experiments if n not in found_exps]
    if missing_exps:
        held = "; ".join(f"{s}: {_listing(sorted(e.name for e in exps))}" for s, (exps, _) in inventory.items())
        raise CompareError(f"unknown experiment {', '.join(map(repr, missing_exps))}; the stores hold: {held}")
    missing_ids = [r for r in run_ids if r not in found_ids]
    if missing_ids:
        lines = []
        for s, (exps, client) in inventory.items():
            runs = _search(client, [str(e.experiment_id) for e in exps], "")
            lines.append(f"{s}: " + _listing(f"{r.info.run_id} ({r.info.run_name})" for r in runs))
        raise CompareError(f"run id {', '.join(map(repr, missing_ids))} not found (or deleted or filtered out); "
                           f"runs that exist: {'; '.join(lines)}")  # fmt: skip
    if not by_id:
        what = f"experiments {experiments}" if experiments else "all experiments"
        held = "; ".join(f"{s}: {_listing(sorted(e.name for e in exps))}" for s, (exps, _) in inventory.items())
        raise CompareError(f"no runs selected ({what}{f', filter {filter_string!r}' if filter_string else ''}) "
                           f"in {len(stores)} store(s); experiments there: {held}")  # fmt: skip
    return Selection(runs=list(by_id.values()), stores=list(stores), notes=notes)
