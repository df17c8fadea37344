"""The operator's dashboard and the HTTP endpoints of the long-running commands: pages, /healthz, /readyz, /metrics.

Read-only: every page is a template over the queries that ``covid-cxr status`` and ``results`` use
(:mod:`worker.results`) and a few of its own (:mod:`web.queries`). May import ``covid_cxr``, ``db``,
``taskqueue``, ``model_store`` and ``worker``; only the composition root (:mod:`service`) imports it.
TensorFlow is imported only by the first request for a Grad-CAM heatmap (:mod:`web.explain`), never by
a page, and never when ``COVID_CXR_WEB_EXPLAIN`` is false.
"""
