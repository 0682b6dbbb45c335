"""VI-ReID evaluation protocols and vectorised ranking metrics."""
