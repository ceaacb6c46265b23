{{/*
Named templates every template of the chart uses (the monitoring and batch templates too).
*/}}

{{/* The chart's name (nameOverride replaces it). */}}
{{- define "farm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" (or the release alone when it already names the chart): the prefix of every object's name. */}}
{{- define "farm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels that select a release's pods; add app.kubernetes.io/component to tell its parts apart. */}}
{{- define "farm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "farm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "farm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "farm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: farm
{{- end }}

{{/*
An image reference "repository:tag". Call with (dict "image" IMAGE "root" $): fields IMAGE leaves
empty (repository, tag) come from .Values.image, and an empty tag is the chart's appVersion; so
(dict "image" .Values.batch.image "root" $) is the gateway's image unless batch.image says otherwise.
*/}}
{{- define "farm.image" -}}
{{- $image := mergeOverwrite (deepCopy .root.Values.image) (.image | default dict) -}}
{{- printf "%s:%s" $image.repository (toString ($image.tag | default .root.Chart.AppVersion)) -}}
{{- end }}

{{/* The imagePullPolicy that goes with "farm.image" (same call). */}}
{{- define "farm.imagePullPolicy" -}}
{{- (mergeOverwrite (deepCopy .root.Values.image) (.image | default dict)).pullPolicy | default "IfNotPresent" -}}
{{- end }}

{{/* imagePullSecrets of a pod spec. */}}
{{- define "farm.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Ports: gRPC and the two metrics endpoints, read from the farm config (FarmConfig's defaults otherwise). */}}
{{- define "farm.grpcPort" -}}
{{- (.Values.config.gateway | default dict).port | default 50051 | int -}}
{{- end }}
{{- define "farm.gatewayMetricsPort" -}}
{{- (.Values.config.gateway | default dict).metrics_port | default 9464 | int -}}
{{- end }}
{{- define "farm.serveMetricsPort" -}}
{{- (.Values.config.scheduler | default dict).metrics_port | default 9465 | int -}}
{{- end }}

{{/* Where farm's state lives inside every pod (an emptyDir): FARM_HOME. */}}
{{- define "farm.home" -}}/var/lib/farm{{- end }}

{{/* The TLS Secret is mounted here. */}}
{{- define "farm.tlsDir" -}}/etc/farm/tls{{- end }}

{{/* The Secret that holds the store's URL, and its key. */}}
{{- define "farm.storeSecretName" -}}
{{- if or .Values.postgresql.enabled .Values.store.url -}}
{{ include "farm.fullname" . }}-store
{{- else -}}
{{ required "store.existingSecret (or store.url, or postgresql.enabled) must name the job store" .Values.store.existingSecret }}
{{- end -}}
{{- end }}
{{- define "farm.storeSecretKey" -}}
{{- if or .Values.postgresql.enabled .Values.store.url -}}url{{- else -}}{{ .Values.store.existingSecretKey }}{{- end -}}
{{- end }}

{{/* The Secret the bootstrap Job writes the first tenant's API key into. */}}
{{- define "farm.apiKeySecretName" -}}
{{- .Values.bootstrap.secretName | default (printf "%s-api-key" (include "farm.fullname" .)) -}}
{{- end }}

{{/* Environment every farm process gets: the store's URL from its Secret (it wins over any file, FarmConfig reads the environment first). */}}
{{- define "farm.storeEnv" -}}
- name: FARM_STORE__URL
  valueFrom:
    secretKeyRef:
      name: {{ include "farm.storeSecretName" . }}
      key: {{ include "farm.storeSecretKey" . }}
{{- end }}

{{/* The artifact store's credentials, as envFrom entries. */}}
{{- define "farm.artifactsEnvFrom" -}}
{{- with .Values.artifacts.envFromSecret -}}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end }}

{{/*
farm's config as the chart runs it: .Values.config with what the chart decides on top (the
state directory, the addresses pods are reached at, TLS files from the mounted Secret). It is
the gateway's farm.yaml and the Serve application's args, so both planes read one config.
*/}}
{{- define "farm.config" -}}
{{- $tls := .Values.gateway.tls -}}
{{- if and (not $tls.enabled) (not .Values.gateway.allowPlaintext) -}}
{{- fail "gateway.tls.enabled is false and gateway.allowPlaintext is false: the gateway would refuse to serve plaintext on the pod network. Give it a TLS Secret (gateway.tls.enabled, gateway.tls.secretName) or allow plaintext where a service mesh encrypts pod traffic." -}}
{{- end -}}
{{- $gateway := dict "host" "0.0.0.0" "allow_plaintext" (not $tls.enabled) -}}
{{- if $tls.enabled -}}
{{- $_ := required "gateway.tls.secretName must name the kubernetes.io/tls Secret when gateway.tls.enabled" $tls.secretName -}}
{{- $dir := include "farm.tlsDir" . -}}
{{- $_ := set $gateway "tls_cert_file" (printf "%s/tls.crt" $dir) -}}
{{- $_ := set $gateway "tls_key_file" (printf "%s/tls.key" $dir) -}}
{{- if $tls.mutual -}}
{{- $_ := set $gateway "tls_client_ca_file" (printf "%s/ca.crt" $dir) -}}
{{- end -}}
{{- end -}}
{{- $managed := dict "home" (include "farm.home" .) "gateway" $gateway "scheduler" (dict "metrics_host" "0.0.0.0") -}}
{{- $config := mergeOverwrite (deepCopy (.Values.config | default dict)) $managed -}}
{{- toYaml $config -}}
{{- end }}

{{/* The name of a GPU worker group from its accelerator type: "gpu-h100". */}}
{{- define "farm.gpuGroupName" -}}
{{- printf "gpu-%s" (regexReplaceAll "[^a-z0-9]+" (lower .) "-") | trunc 40 | trimSuffix "-" -}}
{{- end }}

{{/*
Pod bounds of each GPU worker group, from the farm config's pools: for each accelerator type,
the GPUs its pools need at their min_replicas and at their max_replicas (num_gpus per replica),
divided by the group's gpusPerPod and rounded up. Returns JSON {type: {"min": n, "max": n}}.
A GPU pool whose type has no ray.gpuWorkers entry fails the render: its replicas could never
be placed.
*/}}
{{- define "farm.gpuGroupBounds" -}}
{{- $gpus := dict -}}
{{- range $kind, $_ := .Values.ray.gpuWorkers -}}
{{- $_ := set $gpus $kind (dict "min" 0.0 "max" 0.0) -}}
{{- end -}}
{{- range $model := (.Values.config.models | default list) -}}
{{- $pools := $model.pools -}}
{{- if not $pools -}}
{{- $replicas := $model.replicas | default 1 -}}
{{- $pools = list (dict "device_kind" ($model.device_kind | default "") "num_gpus" ($model.num_gpus | default 0) "min_replicas" $replicas "max_replicas" $replicas) -}}
{{- end -}}
{{- range $pool := $pools -}}
{{- $perReplica := $pool.num_gpus | default 0 | float64 -}}
{{- if gt $perReplica 0.0 -}}
{{- $type := $pool.accelerator_type | default $pool.device_kind -}}
{{- if not (hasKey $gpus $type) -}}
{{- fail (printf "model %s has a GPU pool of accelerator type %q but ray.gpuWorkers has no %q group: add one (its GPUs, node selector and tolerations), or the pool's replicas could never be placed" $model.name $type $type) -}}
{{- end -}}
{{- $perPod := (get $.Values.ray.gpuWorkers $type).gpusPerPod | float64 -}}
{{- if gt $perReplica $perPod -}}
{{- fail (printf "model %s: a replica of its %q pool needs %v GPUs but a ray.gpuWorkers.%s pod has %v (gpusPerPod): it could never be placed" $model.name $type $perReplica $type $perPod) -}}
{{- end -}}
{{- $sums := get $gpus $type -}}
{{- $minReplicas := (hasKey $pool "min_replicas") | ternary $pool.min_replicas 1 -}}
{{- $maxReplicas := (hasKey $pool "max_replicas") | ternary $pool.max_replicas 1 -}}
{{- $_ := set $sums "min" (addf $sums.min (mulf $perReplica $minReplicas)) -}}
{{- $_ := set $sums "max" (addf $sums.max (mulf $perReplica $maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $bounds := dict -}}
{{- range $type, $sums := $gpus -}}
{{- $perPod := (get $.Values.ray.gpuWorkers $type).gpusPerPod | float64 -}}
{{- $_ := set $bounds $type (dict "min" (ceil (divf $sums.min $perPod) | int) "max" (ceil (divf $sums.max $perPod) | int)) -}}
{{- end -}}
{{- toJson $bounds -}}
{{- end }}

{{/*
The quick-start PostgreSQL's password: postgresql.password, else the one an earlier install
generated (read back from its Secret, so an upgrade keeps it), else a new random one. A
template is rendered more than once per install: the random one is kept in .Values._generated
so that every object of one render agrees.
*/}}
{{- define "farm.postgresqlPassword" -}}
{{- if .Values.postgresql.password -}}
{{- .Values.postgresql.password -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (printf "%s-postgresql" (include "farm.fullname" .)) -}}
{{- if and $existing $existing.data (hasKey $existing.data "password") -}}
{{- index $existing.data "password" | b64dec -}}
{{- else -}}
{{- if not (hasKey .Values.postgresql "_generated") -}}
{{- $_ := set .Values.postgresql "_generated" (randAlphaNum 32) -}}
{{- end -}}
{{- .Values.postgresql._generated -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The name of the Serve application (FarmConfig ray.app_name). */}}
{{- define "farm.appName" -}}
{{- ((.Values.config.ray | default dict).app_name | default "farm") -}}
{{- end }}

{{/*
The RayService's Serve config: farm's application built by `farm.serve:build_app` from the
chart's farm config as its args. The scheduler replica is pinned to the head pod by a custom
resource only the head offers, so that its Prometheus endpoint has one stable address (the
head's Service) instead of a different Ray pod after each restart.
*/}}
{{- define "farm.serveConfig" -}}
applications:
  - name: {{ include "farm.appName" . }}
    import_path: farm.serve:build_app
    # farm's API is the gateway's gRPC; the application has no HTTP route.
    route_prefix: null
    args:
      {{- include "farm.config" . | nindent 6 }}
    deployments:
      - name: scheduler
        ray_actor_options:
          num_cpus: 0
          resources:
            {{ include "farm.schedulerResource" . }}: 0.001
{{- end }}

{{/* The custom resource that only the Ray head offers, and the scheduler asks a sliver of. */}}
{{- define "farm.schedulerResource" -}}farm_scheduler{{- end }}

{{/* rayStartParams' `resources`: a JSON object inside shell quotes, as `ray start --resources` takes it. */}}
{{- define "farm.rayResources" -}}
{{- toJson . | quote | squote -}}
{{- end }}

{{/* What every Ray container shares: image, environment, volumes. Call with (dict "root" $ "image" IMAGE). */}}
{{- define "farm.rayContainerCommon" -}}
{{- $root := .root -}}
image: {{ include "farm.image" (dict "image" .image "root" $root) }}
imagePullPolicy: {{ include "farm.imagePullPolicy" (dict "image" .image "root" $root) }}
env:
  {{- include "farm.storeEnv" $root | nindent 2 }}
  - name: FARM_HOME
    value: {{ include "farm.home" $root }}
  {{- with $root.Values.ray.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with (include "farm.artifactsEnvFrom" $root) }}{{ . | nindent 0 }}{{- end }}
# Lets in-flight work end and the node leave the cluster cleanly.
lifecycle:
  preStop:
    exec:
      command: ["/bin/sh", "-c", "ray stop"]
volumeMounts:
  - name: home
    mountPath: {{ include "farm.home" $root }}
  # Ray's object store (frames between engines and post-processing) lives in shared memory.
  - name: shm
    mountPath: /dev/shm
  {{- with $root.Values.ray.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Volumes of every Ray pod. */}}
{{- define "farm.rayVolumes" -}}
volumes:
  - name: home
    emptyDir: {}
  - name: shm
    emptyDir:
      medium: Memory
  {{- with .Values.ray.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
