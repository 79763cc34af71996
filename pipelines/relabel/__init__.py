"""The nightly relabel on Ray Data: `job` is `wsss relabel` (the plan against the ledger, the
night's labeling through `pipelines.label.job`, the ledger and run record) and `rows` its rows
and Ray Data steps (source versions, listings, keying rows for the ledger)."""
