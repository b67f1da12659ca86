"""The HTML report builder and its plots; committed GPU results live under data/."""
