"""The example app: a tiny Flask service, built and deployed by pipeline.example.yaml."""
import os
import socket

from flask import Flask, jsonify

MESSAGE = "hello from runner"

app = Flask(__name__)


@app.get("/")
def index():
    return jsonify(message=MESSAGE, host=socket.gethostname(),
                   version=os.environ.get("APP_VERSION", "dev"))


@app.get("/healthz")
def healthz():
    return "ok\n"
