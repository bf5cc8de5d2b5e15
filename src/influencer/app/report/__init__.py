"""What a run shows: the HTML report, its displays and pictures, and summary.json."""
