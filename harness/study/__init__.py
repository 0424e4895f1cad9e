"""The study machinery, from the study file to the records: `spec` (the file), `rules` (its plain rules), `ledger`
(Optuna) and `tracking` (MLflow), `stores` (their URLs and locks), `scheduler` and `processes` (trials on device
slots), `coordinator` and `live` (running a study), `plan` (its cost before it runs).
"""
