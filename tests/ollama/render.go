// Renders an Ollama Modelfile TEMPLATE the way Ollama does (Go's text/template, system messages joined into .System
// and kept in .Messages): go run render.go TEMPLATE_FILE < messages.json
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	var messages []Message
	if err := json.NewDecoder(os.Stdin).Decode(&messages); err != nil {
		panic(err)
	}
	var system []string
	for _, message := range messages {
		if message.Role == "system" {
			system = append(system, message.Content)
		}
	}
	parsed := template.Must(template.New("modelfile").Parse(string(text)))
	values := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": messages}
	if err := parsed.Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
