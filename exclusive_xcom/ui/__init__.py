"""The Airflow UI's view of the claim ledger: an Airflow plugin (``plugin``), its authorized
FastAPI app (``api``) and the page it serves (``page.html``)."""
