"""The experiment as jobs: the stage list (stage_list.py) that submission (graph.py), `status`
(status.py) and the report (report.py) all iterate. The top layer below the CLI."""
