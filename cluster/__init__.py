"""How wsss runs for real: KubeRay manifests, a `ray up` config, local development services."""
