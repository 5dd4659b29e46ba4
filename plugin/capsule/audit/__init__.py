"""``capsule audit``: what a server stored, classified and verified from certificates alone.

``sources`` reads the rows (the servers' tables, described once, and MAM), ``verdicts`` judges
each one, ``findings`` keeps the tallies, ``report`` renders them (table, JSON, HTML) and
``panel`` checks what an admin's web panel shows, in headless Chromium.
"""
