"""Write the chart's Grafana dashboard from operator/autoglm_operator/dashboard.py (`make dashboard`)."""

from pathlib import Path

from autoglm_operator import dashboard

OUT = Path(__file__).resolve().parents[1] / "charts" / "autoglm" / "dashboards" / "autoglm-endpoints.json"

if __name__ == "__main__":
    OUT.write_text(dashboard.render())
    print(OUT)
