"""PyPI's test kit, shipped with the PyPI plugin: pypiserver as a real upstream index
(`services`), helpers that drive pip, uv and twine isolated from the machine's own configuration
(`clients`), and a builder of real wheels and sdists (`packages`). Its pytest plugin (`plugin`)
adds the `pypiserver` and `pypi_packages` fixtures to the generic ones of `batlehub.testing`."""
