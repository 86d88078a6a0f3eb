"""The Ray Serve application for online extraction: `app` (the builder `serve.app:build_app`), `routes`, `api_types`,
`guard` (keys and limits), `errors`, and the `model` deployment."""
