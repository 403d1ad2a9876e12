"""The dvemb service: FastAPI app, database, storage and the task contracts with the workers."""
