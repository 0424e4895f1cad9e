"""The study's ledger in Optuna, and the only code that touches Optuna: `storage` opens the store and waits out
its outages, `writer.Ledger` is the coordinator's (claims, verdicts, retries, confirmation), `reader.LedgerReader`
the report's, both reading through `studies` with the rules of harness.study.rules.
"""
