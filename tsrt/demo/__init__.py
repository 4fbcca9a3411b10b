"""`tsrt demo`: the bundled demo model on a synthetic phantom, end to end."""
