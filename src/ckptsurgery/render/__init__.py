"""Text rendering of reports: the tables the commands print (:mod:`ckptsurgery.render.tables`).

Nothing heavy is imported here: tabulate is imported when a table is laid out.
"""
