"""SQL views for analysts (and the evaluation job), with the same names, columns and meaning on PostgreSQL and SQLite.

The views resolve ground truth once, in SQL, so that an analyst's query and the nightly report agree:

* an image's true label comes from its most specific labels: ``SOPInstanceUID`` first, then its
  study's ``StudyInstanceUID``, then the study's ``AccessionNumber``;
* a study's true label comes from ``StudyInstanceUID`` labels, then ``AccessionNumber``, then the
  labels of its images;
* when the most specific labels disagree (two sources, two labels) the item is ``conflict``: its
  ``true_label`` is NULL and it is left out of the metrics rather than guessed.

Days are UTC calendar days as ``YYYY-MM-DD`` text on both databases.

Views are versioned like the schema: a migration creates the definitions it names (``VIEWS_0002``)
and never changes them afterwards. To change a view, add ``VIEWS_000N`` here and a migration that
drops the old definitions and creates the new ones. (On SQLite, batch-mode table rebuilds work with
views in place because ``db/migrations/env.py`` turns on ``legacy_alter_table`` while migrating.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Column, DateTime, Float, Integer, MetaData, String, Table, Text, text
from sqlalchemy.engine import Connection


class _Dialect:
    """The few expressions that are spelled differently on PostgreSQL and SQLite."""

    def __init__(self, name: str) -> None:
        if name not in {"postgresql", "sqlite"}:
            raise ValueError(f"views are defined for postgresql and sqlite, not {name!r}")
        self.name = name

    def day(self, column: str) -> str:
        """The UTC calendar day of a timestamp column as ``YYYY-MM-DD`` text."""
        if self.name == "postgresql":
            return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
        return f"date({column})"

    def json_value(self, column: str, *path: str | int, sql_type: str = "DOUBLE PRECISION") -> str:
        """A scalar inside a JSON column, e.g. ``json_value('metrics', 'performance', 'accuracy', 'value')``."""
        if self.name == "postgresql":
            steps = "".join(f" -> {_literal(step)}" for step in path[:-1])
            return f"CAST(({column}{steps}) ->> {_literal(path[-1])} AS {sql_type})"
        json_path = "$" + "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path)
        return f"json_extract({column}, '{json_path}')"

    def json_text(self, column: str) -> str:
        """A JSON column as its text."""
        return f"CAST({column} AS TEXT)" if self.name == "postgresql" else column


def _literal(step: str | int) -> str:
    return str(step) if isinstance(step, int) else f"'{step}'"


@dataclass(frozen=True)
class View:
    """One view: its name, what it shows, and its SELECT for a dialect."""

    name: str
    doc: str
    select: Callable[[_Dialect], str]


def _label_resolution(candidates: str, key: str) -> str:
    """Pick the most specific candidate labels per ``key``; disagreeing labels give ``conflict``."""
    return f"""
WITH candidates AS ({candidates}),
most_specific AS (
    SELECT {key}, MIN(specificity) AS specificity FROM candidates GROUP BY {key}
)
SELECT c.{key},
       MIN(c.key_type) AS key_type,
       CASE WHEN COUNT(DISTINCT c.label) = 1 THEN MIN(c.label) END AS true_label,
       CASE WHEN COUNT(DISTINCT c.label) = 1 THEN 'labelled' ELSE 'conflict' END AS label_status,
       CASE WHEN COUNT(DISTINCT c.source) = 1 THEN MIN(c.source) ELSE 'several' END AS label_source,
       MAX(c.label_date) AS label_date
FROM candidates c
JOIN most_specific m ON m.{key} = c.{key} AND m.specificity = c.specificity
GROUP BY c.{key}"""


_IMAGE_LABEL_CANDIDATES = """
    SELECT i.id AS instance_id, 1 AS specificity, l.key_type, l.label, l.source, l.label_date
    FROM instances i
    JOIN labels l ON l.key_type = 'sop_instance_uid' AND l.key_value = i.sop_instance_uid
    UNION ALL
    SELECT i.id, 2, l.key_type, l.label, l.source, l.label_date
    FROM instances i
    JOIN studies s ON s.id = i.study_id
    JOIN labels l ON l.key_type = 'study_instance_uid' AND l.key_value = s.study_instance_uid
    UNION ALL
    SELECT i.id, 3, l.key_type, l.label, l.source, l.label_date
    FROM instances i
    JOIN studies s ON s.id = i.study_id
    JOIN labels l ON l.key_type = 'accession_number' AND l.key_value = s.accession_number
"""

_STUDY_LABEL_CANDIDATES = """
    SELECT s.id AS study_id, 1 AS specificity, l.key_type, l.label, l.source, l.label_date
    FROM studies s
    JOIN labels l ON l.key_type = 'study_instance_uid' AND l.key_value = s.study_instance_uid
    UNION ALL
    SELECT s.id, 2, l.key_type, l.label, l.source, l.label_date
    FROM studies s
    JOIN labels l ON l.key_type = 'accession_number' AND l.key_value = s.accession_number
    UNION ALL
    SELECT i.study_id, 3, l.key_type, l.label, l.source, l.label_date
    FROM instances i
    JOIN labels l ON l.key_type = 'sop_instance_uid' AND l.key_value = i.sop_instance_uid
    WHERE i.study_id IS NOT NULL
"""

_OUTCOME = """
       CASE WHEN t.true_label IS NULL THEN NULL WHEN t.true_label = {predicted} THEN 1 ELSE 0 END AS correct,
       CASE WHEN t.true_label IS NULL THEN NULL
            WHEN {predicted} = 'covid' AND t.true_label = 'covid' THEN 'TP'
            WHEN {predicted} = 'covid' THEN 'FP'
            WHEN t.true_label = 'covid' THEN 'FN'
            ELSE 'TN' END AS outcome"""


def _image_results(d: _Dialect) -> str:
    return f"""
SELECT p.id AS prediction_id, p.instance_id, p.model_version, p.prob_covid, p.label AS predicted_label,
       p.threshold, p.created_at AS predicted_at, {d.day('p.created_at')} AS day,
       i.sop_instance_uid, i.study_instance_uid, s.accession_number, s.study_date,
       i.modality, i.view_position, i.manufacturer, n.mean AS image_mean, n.std AS image_std,
       t.true_label, t.label_status, t.label_source, t.key_type AS label_key_type,{_OUTCOME.format(predicted='p.label')}
FROM predictions p
JOIN instances i ON i.id = p.instance_id
LEFT JOIN studies s ON s.id = i.study_id
LEFT JOIN normalized_images n ON n.instance_id = p.instance_id
LEFT JOIN v_image_labels t ON t.instance_id = p.instance_id"""


def _study_results(d: _Dialect) -> str:
    return f"""
SELECT r.id AS study_result_id, r.study_id, s.study_instance_uid, s.accession_number, s.study_date,
       r.model_version, r.n_images, r.prob_covid, r.label AS predicted_label, r.rule,
       r.updated_at, {d.day('r.updated_at')} AS day,
       t.true_label, t.label_status, t.label_source, t.key_type AS label_key_type,{_OUTCOME.format(predicted='r.label')}
FROM study_results r
JOIN studies s ON s.id = r.study_id
LEFT JOIN v_study_labels t ON t.study_id = r.study_id"""


def _daily_volume(d: _Dialect) -> str:
    counts = ",\n       ".join(
        f"SUM(CASE WHEN i.state {condition} THEN 1 ELSE 0 END) AS {name}"
        for name, condition in (
            ("predicted", "= 'predicted'"), ("rejected", "= 'rejected'"), ("duplicate", "= 'duplicate'"),
            ("failed", "= 'failed'"), ("pending", "IN ('received', 'queued')"),
        )
    )
    return f"""
SELECT {d.day('i.created_at')} AS day, COUNT(*) AS files,
       {counts}
FROM instances i
GROUP BY 1"""


def _daily_rejects(d: _Dialect) -> str:
    return f"""
SELECT {d.day('i.created_at')} AS day, i.state, COALESCE(i.reason, 'unspecified') AS reason, COUNT(*) AS n
FROM instances i
WHERE i.state IN ('rejected', 'failed')
GROUP BY 1, 2, 3"""


def _model_performance(d: _Dialect) -> str:
    def metric(*path: str | int, sql_type: str = "DOUBLE PRECISION") -> str:
        return d.json_value("r.metrics", *path, sql_type=sql_type)

    columns = [
        f"{metric('performance', 'counts', 'covid', sql_type='INTEGER')} AS n_covid",
        f"{metric('performance', 'counts', 'normal', sql_type='INTEGER')} AS n_normal",
    ]
    for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
        columns += [f"{metric('performance', name, 'value')} AS {name}",
                    f"{metric('performance', name, 'ci', 0)} AS {name}_low",
                    f"{metric('performance', name, 'ci', 1)} AS {name}_high"]
    columns += [
        f"{metric('performance', 'f1', 'value')} AS f1",
        f"{metric('performance', 'roc_auc', 'value')} AS roc_auc",
        f"{metric('performance', 'roc_auc', 'ci', 0)} AS roc_auc_low",
        f"{metric('performance', 'roc_auc', 'ci', 1)} AS roc_auc_high",
        f"{metric('performance', 'brier')} AS brier",
        f"{metric('drift', 'prob_covid', 'psi')} AS psi_prob_covid",
        f"{metric('drift', 'image_mean', 'psi')} AS psi_image_mean",
        f"{metric('drift', 'image_std', 'psi')} AS psi_image_std",
    ]
    joined = ",\n       ".join(columns)
    return f"""
SELECT r.model_version, r.level, r."window", r.period, r.window_start, r.window_end, r.n,
       {joined},
       {d.json_text('r.flags')} AS flags, r.created_at
FROM evaluation_reports r"""


#: The views created by migration 0002, in dependency order. Never edit: add VIEWS_000N instead.
VIEWS_0002: tuple[View, ...] = (
    View("v_image_labels", "one row per labelled instance: its resolved true label (or conflict)",
         lambda d: _label_resolution(_IMAGE_LABEL_CANDIDATES, "instance_id")),
    View("v_study_labels", "one row per labelled study: its resolved true label (or conflict)",
         lambda d: _label_resolution(_STUDY_LABEL_CANDIDATES, "study_id")),
    View("v_image_results", "one row per prediction with the image's DICOM identity, image statistics and true label",
         _image_results),
    View("v_study_results", "one row per study result with the study's true label", _study_results),
    View("v_daily_volume", "files received per UTC day, by final state", _daily_volume),
    View("v_daily_rejects", "rejected and failed files per UTC day, by reason code", _daily_rejects),
    View("v_model_performance", "one row per evaluation report: headline metrics with 95% intervals, drift",
         _model_performance),
)

def _quality_decision(instance_id: str, decision: str) -> str:
    return (f"CASE WHEN EXISTS (SELECT 1 FROM quality_checks q WHERE q.instance_id = {instance_id} "
            f"AND q.decision = '{decision}') THEN 1 ELSE 0 END")


def _image_results_0003(d: _Dialect) -> str:
    return f"""
SELECT r.*,
       {_quality_decision('r.instance_id', 'flag')} AS quality_flagged,
       {_quality_decision('r.instance_id', 'correct')} AS quality_corrected
FROM ({_image_results(d).strip()}) r"""


def _study_results_0003(d: _Dialect) -> str:
    return f"""
SELECT r.*,
       CASE WHEN EXISTS (SELECT 1 FROM instances i JOIN quality_checks q ON q.instance_id = i.id
                         WHERE i.study_id = r.study_id AND q.decision = 'flag') THEN 1 ELSE 0 END AS quality_flagged
FROM ({_study_results(d).strip()}) r"""


def _daily_quality(d: _Dialect) -> str:
    return f"""
SELECT {d.day('q.created_at')} AS day, q.check_name, q.decision, COALESCE(q.finding, 'none') AS finding, q.version,
       COUNT(*) AS n
FROM quality_checks q
GROUP BY 1, 2, 3, 4, 5"""


_BY_NAME_0002 = {view.name: view for view in VIEWS_0002}
#: Migration 0007: the result views gain ``quality_flagged`` (and images ``quality_corrected``), and the
#: quality checks are counted per day. Never edit: add VIEWS_000N instead.
VIEWS_0007: tuple[View, ...] = (
    _BY_NAME_0002["v_image_labels"],
    _BY_NAME_0002["v_study_labels"],
    View("v_image_results", "one row per prediction with the image's DICOM identity, image statistics, true label "
         "and whether a quality check flagged (or corrected) the image", _image_results_0003),
    View("v_study_results", "one row per study result with the study's true label and whether a quality check "
         "flagged one of its images", _study_results_0003),
    _BY_NAME_0002["v_daily_volume"],
    _BY_NAME_0002["v_daily_rejects"],
    _BY_NAME_0002["v_model_performance"],
    View("v_daily_quality", "quality-check outcomes per UTC day, by check, decision, finding and version",
         _daily_quality),
)

#: The views at the schema's head revision.
CURRENT_VIEWS = VIEWS_0007


def create_views(connection: Connection, views: Sequence[View] = CURRENT_VIEWS) -> None:
    """Create ``views`` (in order) on the connection's database."""
    dialect = _Dialect(connection.dialect.name)
    for view in views:
        connection.execute(text(f"CREATE VIEW {view.name} AS {view.select(dialect).strip()}"))


def drop_views(connection: Connection, views: Sequence[View] = CURRENT_VIEWS) -> None:
    """Drop ``views`` (in reverse order) if they exist."""
    for view in reversed(views):
        connection.execute(text(f"DROP VIEW IF EXISTS {view.name}"))


# --- the views as tables, so that queries get typed columns (e.g. timestamps bound the same way
# the ORM stores them on SQLite). A separate MetaData keeps them out of Alembic's autogenerate.
view_metadata = MetaData()

image_results = Table(
    "v_image_results", view_metadata,
    Column("prediction_id", Integer), Column("instance_id", Integer), Column("model_version", String),
    Column("prob_covid", Float), Column("predicted_label", String), Column("threshold", Float),
    Column("predicted_at", DateTime(timezone=True)), Column("day", String),
    Column("sop_instance_uid", String), Column("study_instance_uid", String), Column("accession_number", String),
    Column("study_date", String), Column("modality", String), Column("view_position", String),
    Column("manufacturer", String), Column("image_mean", Float), Column("image_std", Float),
    Column("true_label", String), Column("label_status", String), Column("label_source", String),
    Column("label_key_type", String), Column("correct", Integer), Column("outcome", String),
    Column("quality_flagged", Integer), Column("quality_corrected", Integer),
)

study_results = Table(
    "v_study_results", view_metadata,
    Column("study_result_id", Integer), Column("study_id", Integer), Column("study_instance_uid", String),
    Column("accession_number", String), Column("study_date", String), Column("model_version", String),
    Column("n_images", Integer), Column("prob_covid", Float), Column("predicted_label", String),
    Column("rule", String), Column("updated_at", DateTime(timezone=True)), Column("day", String),
    Column("true_label", String), Column("label_status", String), Column("label_source", String),
    Column("label_key_type", String), Column("correct", Integer), Column("outcome", String),
    Column("quality_flagged", Integer),
)

model_performance = Table(
    "v_model_performance", view_metadata,
    Column("model_version", String), Column("level", String), Column("window", String), Column("period", String),
    Column("window_start", DateTime(timezone=True)), Column("window_end", DateTime(timezone=True)),
    Column("n", Integer), Column("n_covid", Integer), Column("n_normal", Integer),
    *(Column(f"{name}{suffix}", Float) for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv")
      for suffix in ("", "_low", "_high")),
    Column("f1", Float), Column("roc_auc", Float), Column("roc_auc_low", Float), Column("roc_auc_high", Float),
    Column("brier", Float), Column("psi_prob_covid", Float), Column("psi_image_mean", Float),
    Column("psi_image_std", Float), Column("flags", Text), Column("created_at", DateTime(timezone=True)),
)

daily_quality = Table(
    "v_daily_quality", view_metadata,
    Column("day", String), Column("check_name", String), Column("decision", String), Column("finding", String),
    Column("version", String), Column("n", Integer),
)
