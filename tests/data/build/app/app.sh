echo hello from the app
