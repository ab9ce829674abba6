"""What people look at: thumbnails and crops, the HTML page, the web app, maps, pairs and box plots."""
