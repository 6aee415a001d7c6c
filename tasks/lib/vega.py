"""Vega-Lite charts offline: the JavaScript bundle (Vega, Vega-Lite, Vega-Embed) that pages inline.

vl-convert ships the bundle inside its wheel, so no page of this project loads a script from a CDN.
`python -m tasks.lib.vega --dvc-template PATH` writes an HTML template for `dvc plots show --html-template`
with the bundle inlined: DVC's own page loads Vega from jsdelivr and draws nothing offline. The template
leaves out DVC's `{scripts}` placeholder (where DVC would put those CDN tags) and keeps `{plot_divs}`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DVC_VEGA_LITE = "5.20"
"""DVC writes Vega-Lite 5 specs; its template gets that major version (the dashboard uses the latest)."""


def javascript_bundle(vl_version: str | None = None) -> str:
    """Vega + Vega-Lite + Vega-Embed as one classic script that defines `window.vegaEmbed`."""
    import vl_convert

    return vl_convert.javascript_bundle(vl_version=vl_version)


def dvc_plots_template() -> str:
    # `</script` inside an inline script would end it early (in JS strings `<\/` is the same text).
    bundle = javascript_bundle(DVC_VEGA_LITE).replace("</script", "<\\/script")
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n<title>DVC plots (offline)</title>\n'
        f"<script>{bundle}</script>\n"
        "<style>body { font-family: system-ui, sans-serif; } table { border-spacing: 15px; }</style>\n"
        "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dvc-template", type=Path, required=True, help="where to write the offline DVC template")
    arguments = parser.parse_args()
    arguments.dvc_template.parent.mkdir(parents=True, exist_ok=True)
    arguments.dvc_template.write_text(dvc_plots_template(), encoding="utf-8")
    print(arguments.dvc_template)


if __name__ == "__main__":
    main()
