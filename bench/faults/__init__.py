"""The rows of ``bench/reliability.py``: each module runs one family of faults and counts outcomes.

Every trial ends in exactly one :class:`~faults.tally.Outcome` (correct, clear error, wrong bytes,
hang, crash); :class:`~faults.tally.Tally` adds them up for the table.
"""
