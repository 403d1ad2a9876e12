"""`dvemb demo`: trains real models with the recorder and shows their influence through the real service."""
