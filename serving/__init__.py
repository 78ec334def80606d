"""finsent serving: FastAPI + onnxruntime. No training code, no Airflow."""
