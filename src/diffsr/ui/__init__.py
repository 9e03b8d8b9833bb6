"""`diffsr ui`: a local web app over the library (optional extra: pip install "diffsr[ui]").

diffsr.ui.service holds what the app does (no gradio); diffsr.ui.app lays it out with gradio, which only it
imports, so diffsr works without the extra.
"""

INSTALL_HINT = 'the web app needs gradio: pip install "diffsr[ui]"'


def gradio_available() -> bool:
    from importlib.util import find_spec

    return find_spec("gradio") is not None
