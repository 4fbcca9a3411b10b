"""Clinical reports computed from tsrt's masks, as TotalSegmentator 2.18's report commands compute them.

One module per report (aorta, pulmonary, spine, body); each runs the models it needs through the task
layer (tsrt.totalseg), measures only structures that are present and not cut by the field of view, and
writes TotalSegmentator's files. `tsrt report NAME` (tsrt/cli/report.py) is the command line.
"""
