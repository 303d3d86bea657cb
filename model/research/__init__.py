"""Small research reproductions: one file per paper, trained and measured on synthetic tasks."""
