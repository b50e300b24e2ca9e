"""Dataset manifests, public-dataset loaders and benchmark corpus builders."""
